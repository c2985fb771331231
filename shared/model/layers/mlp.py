"""Dense gated MLP down(silu(gate(x)) * up(x)) with TP (each worker rank).

gate/up are one merged column-parallel GEMM (intermediate split), down is row-parallel. `reduce=False` leaves the output
a partial sum (the MoE layer adds the shared expert to the routed sum and all-reduces once).
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.model import ops
from glmserve.shared.model.context import BuildCtx


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, ctx: BuildCtx, prefix: str, reduce: bool = True):
        super().__init__()
        # [gate_local | up_local] rows: one GEMM, then silu(gate) * up
        self.gate_up_proj = ctx.merged(prefix, ("gate_proj", "up_proj"), hidden, [inter, inter])
        # reduce=False: this rank's partial sum; the caller all-reduces
        self.down_proj = ctx.linear(f"{prefix}.down_proj", inter, hidden, False, "row", reduce=reduce)
        self.input_fp8 = self.gate_up_proj.fp8  # callers may hand forward x's per-token FP8 form

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H] (x_fp8: its per-token FP8 form, from a fused norm) -> [T, H]."""
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x, x_fp8)))
