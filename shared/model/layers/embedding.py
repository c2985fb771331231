"""Vocab-parallel embedding and lm_head (each worker rank).

The vocab is padded to a multiple of tp_size; rank r owns rows [r*Vp/tp, (r+1)*Vp/tp). The embedding
zeroes rows it does not own and all-reduces; the lm_head computes local logits and all-gathers them,
then drops the padding, so `forward` returns full-vocab logits [R, V] on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.shared.model.layers.linear import copy_checked, set_loader
from glmserve.shared.model.parallel import SINGLE, TPGroup

# The logits straight out of the GEMM in fp32 on CUDA for bf16 / fp16 weights (cuBLAS: fp32 accumulation, fp32
# store) from FP32_LOGITS_MIN_ROWS rows, instead of a [R, V] bf16 product and a .float() copy: at R 256 x V 151,552
# that copy reads 78 MB and writes 155 MB after the GEMM wrote the 78 (~60 us, H100 run 32's profile). The values
# are the fp32 sums before the bf16 rounding HF's lm_head applies (closer to the exact product; a near-tie can go
# the other way). H100 run 40 (bench/ab_step.py --switch lm_fp32, FP8 GLM-4.7-Flash step, median graph ms on / off):
# B 256 19.008 / 19.184 (lower in both rounds), B 64 15.075 / 15.035 (higher in both): fewer rows keep the copy.
# False: F.linear + .float() at every size.
FP32_LOGITS = True
FP32_LOGITS_MIN_ROWS = 256


def lm_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, H] . weight [V, H]^T -> [R, V] fp32."""
    if (FP32_LOGITS and x.is_cuda and x.shape[0] >= FP32_LOGITS_MIN_ROWS and x.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16)):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x, weight).float()


class _VocabShard(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype, device):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        padded = -(-vocab_size // tp.tp_size) * tp.tp_size
        self.local_vocab = padded // tp.tp_size
        self.vocab_start = tp.tp_rank * self.local_vocab
        self.weight = set_loader(
            nn.Parameter(torch.zeros(self.local_vocab, hidden_size, dtype=dtype, device=device), requires_grad=False),
            self._load,
        )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"vocab rows {loaded.shape[0]} != vocab_size {self.vocab_size}")
        rows = loaded.narrow(0, self.vocab_start, max(0, min(self.local_vocab, self.vocab_size - self.vocab_start)))
        param.data.zero_()
        copy_checked(param.data[: rows.shape[0]], rows)


class VocabParallelEmbedding(_VocabShard):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE, dtype=torch.float32, device="cpu"):
        super().__init__(vocab_size, hidden_size, tp, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, H]."""
        if self.tp.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        own = (local >= 0) & (local < self.local_vocab)
        out = F.embedding(local.clamp(0, self.local_vocab - 1), self.weight) * own[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(_VocabShard):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE, dtype=torch.float32, device="cpu"):
        super().__init__(vocab_size, hidden_size, tp, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, H] -> logits [R, V] fp32, full vocab on every rank (R = 0: no collective, same on all ranks)."""
        if x.shape[0] == 0:
            return x.new_zeros(0, self.vocab_size, dtype=torch.float32)
        logits = lm_logits(x, self.weight)
        return self.tp.all_gather_last(logits)[:, : self.vocab_size]
