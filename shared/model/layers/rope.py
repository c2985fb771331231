"""Rotary position embedding tables (each worker rank; no weights).

inv_freq[i] = 1 / theta^(2i / rotary_dim); cos/sin for a position are computed in fp32 per call from the
batch positions (cheap, exact, no max-length table). NeoX pairing for glm4_moe, interleaved for MLA.
"""

from __future__ import annotations

import torch

from glmserve.shared.model import ops


class RotaryEmbedding:
    def __init__(self, rotary_dim: int, theta: float, interleaved: bool, device="cpu"):
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        exps = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        self.inv_freq = (1.0 / (theta ** exps)).to(device)  # [rotary_dim // 2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) each [T, rotary_dim // 2] fp32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def __call__(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, heads, D]: rotate the first rotary_dim dims (into `out`, x's shape, when given)."""
        return ops.rope(x, cos_sin[0], cos_sin[1], self.rotary_dim, self.interleaved, out)
