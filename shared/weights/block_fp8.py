"""Block-scaled FP8 checkpoints (`quant_method: fp8` + `weight_block_size`, or compressed-tensors
`strategy: block`): every worker rank, at load.

Each F8_E4M3 `<name>.weight` [out, in] comes with `<name>.weight_scale_inv` (or `.weight_scale`)
[ceil(out/bo), ceil(in/bi)]; W = W_fp8 * scale broadcast over its block. The pairer dequantizes each
pair to fp32 and hands the float weight on; the FP8 layers then re-quantize it per output channel
(the layout the kernels run), as with --quantization fp8. GLM-4.x-FP8 itself is per-channel (spec §4).
"""

from __future__ import annotations

import torch

from glmserve.shared.weights.lazy import materialize

SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


def dequant_block(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [out, in] fp8, scale [ceil(out/bo), ceil(in/bi)] -> fp32 [out, in]."""
    bo, bi = block
    full = scale.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return w.float() * full[: w.shape[0], : w.shape[1]]


class BlockPairer:
    """Holds a block-FP8 weight or its scale until its partner arrives (any order, any shard)."""

    def __init__(self, block: tuple[int, int]):
        self.block = block
        self.weights: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def feed(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Returns the (key, tensor) pairs ready to load now (possibly none)."""
        for suffix in SCALE_SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                self.scales[base] = materialize(tensor)  # partners may sit in different files
                return self._ready(base)
        if key.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn:
            base = key[: -len(".weight")]
            self.weights[base] = materialize(tensor)
            return self._ready(base)
        return [(key, tensor)]

    def _ready(self, base: str) -> list[tuple[str, torch.Tensor]]:
        if base in self.weights and base in self.scales:
            w, s = self.weights.pop(base), self.scales.pop(base)
            return [(base + ".weight", dequant_block(w, s, self.block))]
        return []

    def check_empty(self) -> None:
        unpaired = sorted(set(self.weights) | set(self.scales))
        if unpaired:
            raise KeyError(f"block-FP8 weights without their scale (or scales without weights): {unpaired[:10]}")
