"""A checkpoint tensor that is read from disk only when used, and only the part a TP rank keeps
(every worker rank, at load). `narrow` composes without I/O; `materialize()` reads the selected block
through safetensors' `get_slice`, so a rank of a TP-8 group reads about 1/8 of each sharded tensor.
"""

from __future__ import annotations

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


class LazyTensor:
    def __init__(self, sl, shape: tuple[int, ...], dtype: torch.dtype, index: tuple[slice, ...] | None = None):
        self._slice, self.shape, self.dtype = sl, torch.Size(shape), dtype
        self._index = index or tuple(slice(0, n) for n in shape)

    @staticmethod
    def from_safetensors(sl) -> "LazyTensor":
        return LazyTensor(sl, tuple(sl.get_shape()), DTYPES[sl.get_dtype()])

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"narrow({dim}, {start}, {length}) outside shape {tuple(self.shape)}")
        index = list(self._index)
        base = index[dim].start
        index[dim] = slice(base + start, base + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return LazyTensor(self._slice, tuple(shape), self.dtype, tuple(index))

    def materialize(self) -> torch.Tensor:
        if self.dim() == 0:
            return self._slice[:]
        return self._slice[self._index]


def materialize(t) -> torch.Tensor:
    """A torch tensor from a LazyTensor (reads the file) or a torch tensor (as is)."""
    return t.materialize() if isinstance(t, LazyTensor) else t
