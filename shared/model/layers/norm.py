"""RMSNorm (HF semantics; each worker rank). Weight replicated on every TP rank."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from glmserve.shared.model import ops
from glmserve.shared.model.layers.linear import copy_checked, set_loader


class Prenormed(NamedTuple):
    """A layer's output that already went through the next layer's input norm (MoE.forward_normed with the
    layer's next_norm): y [T, H] the normed rows, y_fp8 their per-token FP8 form or None. The residual (x + residual
    before that norm) travels beside it as usual."""
    y: torch.Tensor
    y_fp8: tuple[torch.Tensor, torch.Tensor] | None


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

    def apply(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: bool = False):
        """x [T, dim] -> (normed, x + residual or None, FP8 form of normed or None). quant: the consumer is an
        FP8 GEMM, so the norm kernel also quantizes its output per token (one launch fewer; the CPU
        references return None and the consumer quantizes, or not, as before)."""
        if not quant:
            return (self.forward(x), None, None) if residual is None else (*self.forward(x, residual), None)
        if residual is None:
            y, x_fp8 = ops.rms_norm_fp8(x, self.weight, self.eps)
            return y, None, x_fp8
        return ops.add_rms_norm_fp8(x, residual, self.weight, self.eps)
