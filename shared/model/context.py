"""Build context handed to every layer constructor (each worker rank): TP group, dtype, device, FP8 policy.

`fp8_modules(name)` says whether the Linear named `name` (checkpoint name without `.weight`) holds FP8
weights: from the checkpoint's own F8_E4M3 tensors, or from --quantization fp8 minus the spec's ignore list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from glmserve.shared.model.layers.linear import Linear
from glmserve.shared.model.parallel import SINGLE, TPGroup


def _never(name: str) -> bool:
    return False


@dataclass(frozen=True)
class BuildCtx:
    tp: TPGroup = SINGLE
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    fp8_modules: Callable[[str], bool] = field(default=_never)
    fuse_shared_experts: bool = True  # MoE: the shared expert as the stacked experts' last slot (layers/moe.py)

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = False,
               parallel: str = "replicated", out_shard: tuple[int, int] | None = None,
               reduce: bool = True) -> Linear:
        return Linear(in_features, out_features, bias, parallel, self.tp, self.fp8_modules(name), out_shard,
                      self.dtype, self.device, reduce=reduce)

    def merged(self, prefix: str, names: tuple[str, ...], in_features: int, outs: list[int], bias: bool = False,
               parallel: str = "column", shards: list[tuple[int, int]] | None = None) -> Linear:
        """Checkpoint weights `<prefix>.<name>` stacked along the output dim into one GEMM.

        shards: rows each part keeps on this rank (default: even split for column, all for replicated)."""
        if shards is None:
            shards = [self.tp.shard(o) if parallel == "column" else (0, o) for o in outs]
        return Linear(in_features, sum(outs), bias, parallel, self.tp, self.fp8_modules(f"{prefix}.{names[0]}"),
                      None, self.dtype, self.device, parts=list(zip(outs, shards)), part_names=names)
