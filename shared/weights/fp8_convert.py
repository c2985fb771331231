"""Convert a float HF checkpoint to the GLM-4.x-FP8 compressed-tensors layout (tests and tools; offline).

Every Linear weight outside the spec §4 ignore list becomes F8_E4M3 [out, in] + `weight_scale` [out, 1]
(static per output channel); activations are declared dynamic per token. Also writes the dequantized
float twin (W_fp8 * scale) when asked, which is the reference an FP8 load must match.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from shared.model.layers.linear import quantize_per_channel
from shared.weights.loader import checkpoint_files, iter_tensors

IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*norm$", "re:.*mlp\\.gate$", "re:.*eh_proj$",
          "re:.*shared_head\\.head$"]
_IGNORE_RE = re.compile(r"(^lm_head$|embed_tokens$|norm$|\.mlp\.gate$|eh_proj$|shared_head\.head$)")


def _quantized(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.dim() == 2 and _IGNORE_RE.search(key[: -len(".weight")]) is None


def _quant_config() -> dict:
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": IGNORE,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme, "input_activations": acts}}}


def convert_to_fp8(src: str, dst: str, dequantized_dst: str | None = None) -> str:
    """Write the FP8 checkpoint of `src` at `dst` (and its dequantized float twin at dequantized_dst)."""
    fp8, deq = {}, {}
    for key, t in iter_tensors(src):
        if _quantized(key, t):
            q, scale = quantize_per_channel(t)
            fp8[key], fp8[key[: -len(".weight")] + ".weight_scale"] = q, scale
            deq[key] = (q.float() * scale).to(t.dtype)
        else:
            fp8[key] = deq[key] = t
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for out, tensors, qc in ((dst, fp8, _quant_config()), (dequantized_dst, deq, None)):
        if out is None:
            continue
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = dict(config, quantization_config=qc) if qc else dict(config)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(src, extra)):
                shutil.copy(os.path.join(src, extra), out)
    assert checkpoint_files(dst)
    return dst
