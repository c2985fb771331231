"""Sort/align (token, slot) pairs by expert in ONE launch, for decode-sized batches (every worker rank).

Same output as the torch reference kernels.moe_route.moe_align (which it falls back to above
MAX_PAIRS pairs, where prefill's GEMMs dwarf the ~10 small torch launches): pairs grouped by expert in
pair order (a stable sort), each expert's run padded to BLOCK_M rows with the sentinel num_pairs, and
the expert of each BLOCK_M block (-1 past the last used block). A single program walks the pairs in
CHUNK-sized pieces: pass 1 counts per expert; padded run starts by a cumsum over experts; pass 2 places
each pair at run_start[e] + (pairs of e seen before it), the in-chunk rank from a cumsum of one-hots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, new_out, next_pow2
from glmserve.kernels.moe_route import moe_align as moe_align_ref

MAX_PAIRS = 8192


@triton.jit
def _align_kernel(ids_ptr, pairs_ptr, block_expert_ptr, num_pairs, cap, E,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    ex = tl.arange(0, BLOCK_E)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        e = tl.load(ids_ptr + start + offs, mask=start + offs < num_pairs, other=-1)
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E] end row of each expert's padded run
    for start in range(0, cap, CHUNK):
        tl.store(pairs_ptr + start + offs, num_pairs, mask=start + offs < cap)
    tl.debug_barrier()  # the sentinel fill lands before any thread places a pair over it
    seen = ends - padded  # next free row of each expert's run
    for start in range(0, num_pairs, CHUNK):
        p = start + offs
        e = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        onehot = (e[:, None] == ex[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs earlier in this chunk
        dest = tl.sum(onehot * (before + seen[None, :]), axis=1)
        tl.store(pairs_ptr + dest, p, mask=p < num_pairs)
        seen += tl.sum(onehot, axis=0)
    for start in range(0, cap // BLOCK_M, CHUNK):
        b = start + offs
        done = (ends[None, :] <= (b * BLOCK_M)[:, None]) & (ex[None, :] < E)  # experts ending at or before b
        expert = tl.sum(done.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(expert < E, expert, -1), mask=b < cap // BLOCK_M)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs [cap] int32, block_expert [cap // block_m] int32); see moe_align_ref."""
    check(ids.dim() == 2 and ids.dtype in (torch.int32, torch.int64), "ids must be [T, k] ints")
    num_pairs = ids.numel()
    if num_pairs > MAX_PAIRS or num_experts > 1024:
        return moe_align_ref(ids, num_experts, block_m)
    cap = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    pairs = new_out((cap,), torch.int32, ids.device)
    block_expert = new_out((cap // block_m,), torch.int32, ids.device)
    block_e = next_pow2(num_experts)
    _align_kernel[(1,)](ids.contiguous(), pairs, block_expert, num_pairs, cap, num_experts,
                        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, 8192 // block_e), num_warps=8)
    return pairs, block_expert
