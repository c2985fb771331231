"""Convert a float HF checkpoint to the GLM-4.x-FP8 compressed-tensors layout, or to block-scaled FP8
(tests and tools; offline).

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

from glmserve.shared.model.layers.linear import quantize_per_channel
from glmserve.shared.model.ops import FP8_MAX
from glmserve.shared.weights.block_fp8 import dequant_block
from glmserve.shared.weights.loader import iter_tensors

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


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale [ceil(out/bo), ceil(in/bi)]) with w ~= q * scale per block."""
    bo, bi = block
    out_dim, in_dim = w.shape
    nb_o, nb_i = -(-out_dim // bo), -(-in_dim // bi)
    padded = torch.zeros(nb_o * bo, nb_i * bi)
    padded[:out_dim, :in_dim] = w.float()
    amax = padded.view(nb_o, bo, nb_i, bi).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out_dim, :in_dim]
    return (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def convert_to_fp8(src: str, dst: str, dequantized_dst: str | None = None,
                   block: tuple[int, int] | None = None) -> str:
    """Write the FP8 checkpoint of `src` at `dst` (and its dequantized float twin at dequantized_dst).

    block None: compressed-tensors per-channel (`weight_scale` [out, 1]); else the block-scaled `fp8`
    method (`weight_scale_inv` [ceil(out/bo), ceil(in/bi)], config `weight_block_size`)."""
    fp8, deq = {}, {}
    for key, t in iter_tensors(src):
        if not _quantized(key, t):
            fp8[key] = deq[key] = t
            continue
        base = key[: -len(".weight")]
        if block is None:
            q, scale = quantize_per_channel(t)
            fp8[key], fp8[base + ".weight_scale"] = q, scale
            deq[key] = (q.float() * scale).to(t.dtype)
        else:
            q, scale = quantize_blocks(t, block)
            fp8[key], fp8[base + ".weight_scale_inv"] = q, scale
            deq[key] = dequant_block(q, scale, block).to(t.dtype)
    qc = _quant_config() if block is None else {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                "weight_block_size": list(block)}
    _write(src, dst, fp8, qc)
    if dequantized_dst is not None:
        _write(src, dequantized_dst, deq, None)
    return dst


def _write(src: str, out: str, tensors: dict[str, torch.Tensor], quant_config: dict | None) -> None:
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    if quant_config:
        config["quantization_config"] = quant_config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), out)
