"""Linear layers with tensor parallelism and per-parameter weight loaders (each worker rank).

- replicated: every rank holds the full [out, in] weight.
- column: rank r holds output rows `out_shard` (default: an even split); output stays sharded.
- row: rank r holds input columns [r*in/tp, (r+1)*in/tp); the output is all-reduced here, then bias added.
FP8 (`fp8=True`): `weight` is e4m3 [out_local, in_local] with `weight_scale` [out_local, 1] fp32
(per output channel). A float checkpoint tensor fed to an fp8 layer is quantized at load (--quantization fp8).
Every parameter has `weight_loader(param, tensor, part=0)` that cuts this rank's shard from the full
tensor; merged layers (qkv_proj, gate_up_proj, fused_qkv_a_proj) stack several checkpoint weights as parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.shared.model import ops
from glmserve.shared.model.parallel import SINGLE, TPGroup
from glmserve.shared.weights.lazy import materialize


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (e4m3 [out, in], scale [out, 1] fp32) with w ~= q * scale."""
    scale = (w.float().abs().amax(-1, keepdim=True) / ops.FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-ops.FP8_MAX, ops.FP8_MAX).to(torch.float8_e4m3fn), scale


def set_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def copy_checked(param: torch.Tensor, loaded, name: str = "") -> None:
    """Copy a checkpoint tensor (torch or LazyTensor: read now) into param after a shape check."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch loading {name}: checkpoint shard {tuple(loaded.shape)} vs {tuple(param.shape)}")
    param.data.copy_(materialize(loaded).to(param.dtype))


class Linear(nn.Module):
    """One weight, or several checkpoint weights stacked along the output dim ("merged": q/k/v, gate/up).

    parts: [(full_out, (start, size))] per stacked checkpoint weight: its full output size and the rows
    this rank keeps. Default: one part, rows split evenly (column) or all rows (replicated/row).
    part_names: the checkpoint module names of the parts (the loader maps `<prefix>.<name>.*` here).
    """

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
        parts: list[tuple[int, tuple[int, int]]] | None = None,
        part_names: tuple[str, ...] = (),
        reduce: bool = True,
    ):
        super().__init__()
        assert parallel in ("replicated", "column", "row")
        self.parallel, self.tp, self.fp8, self.part_names = parallel, tp, fp8, part_names
        self.reduce = reduce  # row: False leaves a partial sum for the caller to all-reduce (bias then unsupported)
        assert reduce or not bias
        self.in_shard = tp.shard(in_features) if parallel == "row" else (0, in_features)
        if parts is None:
            shard = (out_shard or tp.shard(out_features)) if parallel == "column" else (0, out_features)
            parts = [(out_features, shard)]
        self.parts = parts
        self.offsets = [sum(p[1][1] for p in parts[:i]) for i in range(len(parts))]  # local row offsets
        out_local, in_local = sum(p[1][1] for p in parts), self.in_shard[1]
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        self.weight = _param(torch.empty(out_local, in_local, dtype=wdtype, device=device), self._load_weight)
        self.weight_scale = None
        if fp8:
            self.weight_scale = _param(torch.ones(out_local, 1, device=device), self._load_scale)
        self.bias = None
        if bias:
            self.bias = _param(torch.zeros(out_features if parallel == "row" else out_local, dtype=dtype,
                                           device=device), self._load_bias)

    def _rows(self, t: torch.Tensor, part: int) -> tuple[torch.Tensor, slice]:
        """(this rank's rows of part `part` from the full checkpoint tensor, destination rows)."""
        full, (start, size) = self.parts[part]
        if t.shape[0] != full:
            raise ValueError(f"checkpoint tensor has {t.shape[0]} rows, expected {full}")
        off = self.offsets[part]
        return t.narrow(0, start, size), slice(off, off + size)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        rows, dst = self._rows(loaded, part)
        shard = materialize(rows.narrow(1, *self.in_shard))
        if self.fp8 and loaded.dtype != torch.float8_e4m3fn:  # online quantization of a float checkpoint
            q, scale = quantize_per_channel(shard)
            copy_checked(param.data[dst], q)
            self.weight_scale.data[dst] = scale
            self.weight_scale.loaded_online = True  # type: ignore[union-attr]
            return
        if not self.fp8 and loaded.dtype == torch.float8_e4m3fn:
            raise ValueError("fp8 checkpoint tensor for a layer built without fp8")
        copy_checked(param.data[dst], shard)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        rows, dst = self._rows(materialize(loaded).reshape(-1, 1).float(), part)
        copy_checked(param.data[dst], rows)

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        if self.parallel == "row":
            copy_checked(param, loaded)
        else:
            rows, dst = self._rows(loaded, part)
            copy_checked(param.data[dst], rows)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """[T, out_local] -> one view per part."""
        return list(y.split([p[1][1] for p in self.parts], dim=-1))

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [T, in_local] -> [T, out_local] (row: full out, all-reduced, then bias). x_fp8: x's per-token
        FP8 form (q [T, in], scale [T, 1]) when a fused norm made it (used by FP8 layers' W8A8 kernel)."""
        bias = None if self.parallel == "row" else self.bias
        if self.fp8:
            y = ops.fp8_linear(x, self.weight, self.weight_scale, bias, x_fp8)
        else:
            y = F.linear(x, self.weight, bias)
        return self._reduced(y)

    def forward_normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """forward(rms_norm(x, norm_weight, eps)) for an FP8 layer that is the norm's only consumer: the kernel may
        normalise inside the GEMM (ops.rms_norm_fp8_linear; one launch at decode's smallest batches)."""
        if not self.fp8:
            raise ValueError("forward_normed is for FP8 layers")
        bias = None if self.parallel == "row" else self.bias
        return self._reduced(ops.rms_norm_fp8_linear(x, norm_weight, eps, self.weight, self.weight_scale, bias))

    def _reduced(self, y: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's partial products summed over the TP ranks, then its bias; others as they are."""
        if self.parallel == "row" and self.reduce:
            y = self.tp.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y


def _param(t: torch.Tensor, loader) -> nn.Parameter:
    return set_loader(nn.Parameter(t, requires_grad=False), loader)
