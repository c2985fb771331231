"""glmserve: a disaggregated (prefill/decode) serving fleet for the GLM-4.x MoE models.

Every importable part is a subpackage of this one namespace: glmserve.router, glmserve.prefill_worker,
glmserve.decode_worker, glmserve.shared, glmserve.kernels (their sources are the checkout's top-level
folders of those names, which have no __init__.py and so never shadow an installed distribution, e.g.
Hugging Face's `kernels`) and glmserve.deploy (the launcher, with its supervisord template and model
configs as package data). An installed wheel holds them all under glmserve/; in a checkout (an editable
install, or the root on sys.path) the root is added to this package's path to find the source folders.
"""
import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")) and _os.path.isdir(_os.path.join(_ROOT, "kernels")):
    __path__.append(_ROOT)  # noqa: F821 - the package's own path list
