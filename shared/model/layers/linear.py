"""Linear layers with tensor parallelism and per-parameter weight loaders (each worker rank).

- replicated: every rank holds the full [out, in] weight.
- column: rank r holds output rows `out_shard` (default: an even split); output stays sharded.
- row: rank r holds input columns [r*in/tp, (r+1)*in/tp); the output is all-reduced here, then bias added.
FP8 (`fp8=True`): `weight` is e4m3 [out_local, in_local] with `weight_scale` [out_local, 1] fp32
(per output channel). A float checkpoint tensor fed to an fp8 layer is quantized at load (--quantization fp8).
Every parameter has `weight_loader(param, tensor)` that cuts this rank's shard from the full tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.model import ops
from shared.model.parallel import SINGLE, TPGroup


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (e4m3 [out, in], scale [out, 1] fp32) with w ~= q * scale."""
    scale = (w.float().abs().amax(-1, keepdim=True) / ops.FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-ops.FP8_MAX, ops.FP8_MAX).to(torch.float8_e4m3fn), scale


def set_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch loading {name}: checkpoint shard {tuple(loaded.shape)} vs {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        parallel: str = "replicated",
        tp: TPGroup = SINGLE,
        fp8: bool = False,
        out_shard: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        assert parallel in ("replicated", "column", "row")
        self.parallel, self.tp, self.fp8 = parallel, tp, fp8
        self.out_shard = (0, out_features)
        self.in_shard = (0, in_features)
        if parallel == "column":
            self.out_shard = out_shard or tp.shard(out_features)
        elif parallel == "row":
            self.in_shard = tp.shard(in_features)
        out_local, in_local = self.out_shard[1], self.in_shard[1]
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        self.weight = set_loader(
            nn.Parameter(torch.empty(out_local, in_local, dtype=wdtype, device=device), requires_grad=False),
            self._load_weight,
        )
        self.weight_scale = None
        if fp8:
            self.weight_scale = set_loader(
                nn.Parameter(torch.ones(out_local, 1, dtype=torch.float32, device=device), requires_grad=False),
                self._load_scale,
            )
        self.bias = None
        if bias:
            self.bias = set_loader(
                nn.Parameter(torch.zeros(out_features if parallel == "row" else out_local, dtype=dtype, device=device),
                             requires_grad=False),
                self._load_bias,
            )

    def _cut(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's [out_local, in_local] block of a full [out, in] tensor (scales: [out, 1])."""
        o0, on = self.out_shard
        t = t.narrow(0, o0, on)
        if t.dim() == 2 and t.shape[1] > 1:
            i0, n = self.in_shard
            t = t.narrow(1, i0, n)
        return t

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = self._cut(loaded)
        if self.fp8 and loaded.dtype != torch.float8_e4m3fn:  # online quantization of a float checkpoint
            q, scale = quantize_per_channel(shard)
            param.data.copy_(q)
            self.weight_scale.data.copy_(scale)
            self.weight_scale.loaded_online = True  # type: ignore[union-attr]
            return
        if not self.fp8 and loaded.dtype == torch.float8_e4m3fn:
            raise ValueError("fp8 checkpoint tensor for a layer built without fp8")
        copy_checked(param, shard)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_checked(param, self._cut(loaded.reshape(-1, 1).float()))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_checked(param, loaded if self.parallel == "row" else loaded.narrow(0, *self.out_shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_local] -> [T, out_local] (row: full out, all-reduced)."""
        row_bias = self.bias if self.parallel == "row" else None
        bias = None if self.parallel == "row" else self.bias
        if self.fp8:
            y = ops.fp8_linear(x, self.weight, self.weight_scale, bias)
        else:
            y = F.linear(x, self.weight, bias)
        if self.parallel == "row":
            y = self.tp.all_reduce(y)
            if row_bias is not None:
                y = y + row_bias
        return y
