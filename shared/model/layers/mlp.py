"""Dense gated MLP down(silu(gate(x)) * up(x)) with TP (each worker rank).

gate/up are column-parallel (intermediate split), down is row-parallel. `reduce=False` leaves the output
a partial sum (the MoE layer adds the shared expert to the routed sum and all-reduces once).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from shared.model import ops
from shared.model.context import BuildCtx


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, ctx: BuildCtx, prefix: str, reduce: bool = True):
        super().__init__()
        self.gate_proj = ctx.linear(f"{prefix}.gate_proj", hidden, inter, False, "column")
        self.up_proj = ctx.linear(f"{prefix}.up_proj", hidden, inter, False, "column")
        self.down_proj = ctx.linear(f"{prefix}.down_proj", inter, hidden, False, "row")
        if not reduce:  # this rank's partial sum; the caller all-reduces
            self.down_proj.tp = dataclasses.replace(ctx.tp, tp_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        h = ops.silu_and_mul(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1))
        return self.down_proj(h)
