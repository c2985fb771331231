"""glmserve: a disaggregated (prefill/decode) serving fleet for the GLM-4.x MoE models.

Every importable part lives under this one namespace, so no folder of the project can shadow an
installed distribution (Hugging Face's `kernels`, which transformers imports, among them):
router/, prefill_worker/, decode_worker/, shared/, kernels/ and deploy/ (the launcher, with its
supervisord template and model configs as package data).
"""
