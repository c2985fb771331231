"""Tensor-parallel group handle passed to every layer (each worker rank; gloo on CPU, NCCL on GPU).

A layer that makes partial sums calls `all_reduce`; the vocab-parallel lm_head calls `all_gather_last`.
With tp_size 1 both are no-ops, so single-process code never needs torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    tp_rank: int = 0
    tp_size: int = 1
    group: dist.ProcessGroup | None = None  # None: the default group (when tp_size > 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks; returns x."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., n * tp_size], rank-major along the last dim."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, full: int) -> tuple[int, int]:
        """(start, size) of this rank's slice of a dim of length `full` (must divide evenly)."""
        if full % self.tp_size:
            raise ValueError(f"dim {full} is not divisible by tp_size {self.tp_size}")
        size = full // self.tp_size
        return self.tp_rank * size, size


SINGLE = TPGroup()
