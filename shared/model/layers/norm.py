"""RMSNorm (HF semantics; each worker rank). Weight replicated on every TP rank."""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.model import ops
from glmserve.shared.model.layers.linear import copy_checked, set_loader


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.eps = eps
        self.weight = set_loader(
            nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False),
            lambda p, t: copy_checked(p, t),
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """x [..., dim] -> normed (into `out`, [T, dim] rows, when given); with residual ->
        (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, out)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
