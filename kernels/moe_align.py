"""Sort/align (token, slot) pairs by expert in ONE launch, for decode-sized batches (every worker rank).

Same output as the torch reference kernels.moe_route.moe_align (which it falls back to above
MAX_PAIRS pairs, where prefill's GEMMs dwarf the ~10 small torch launches): pairs grouped by expert in
pair order (a stable sort), each expert's run padded to BLOCK_M rows with the sentinel num_pairs, and
the expert of each BLOCK_M block (-1 past the last used block).

One program per expert, all in parallel: each counts every expert's pairs (a tl.histogram of CHUNK pairs
at a time: the ids are a few KB, read from L2 by every program), takes its padded run's start from
the cumsum, then writes only what is its own: its pairs (rank from a 1-D cumsum of its matches), its
run's padding rows, its blocks' expert id; program 0 also writes the rows and blocks past the last run.
Every output element has exactly one writer, so no barrier. (The single-program version walked the
pairs twice with a [CHUNK, E] 2-D cumsum: 29 us per MoE layer at B 256 on an H200, 1.3 ms a step; the
per-expert one with a [128, E] one-hot count walked 1,280 pairs in 2 x 10 dependent steps: 13.5 us on
an H100, H100 run 15. CHUNK 1024 with the histogram: 2 x 2.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, new_out, next_pow2, pdl_enter, pdl_kw
from glmserve.kernels.moe_route import moe_align as moe_align_ref

MAX_PAIRS = 8192
CHUNK = 1024  # pairs per step of both walks (histogram count, 1-D cumsum scatter)


@triton.jit
def _align_kernel(ids_ptr, pairs_ptr, block_expert_ptr, num_pairs, cap, E,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                  DENSE_LAST: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # DENSE_LAST: expert E - 1 is the fused shared expert, every token's slot K - 1 (pairs t*K + K-1, in order):
    # its run needs no counting or matching and goes last, after the E - 1 routed experts' runs.
    me = tl.program_id(0)
    ex = tl.arange(0, BLOCK_E)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):  # the dense expert's run is not counted (not in `ends`)
        e = tl.load(ids_ptr + start + offs, mask=start + offs < num_pairs, other=-1).to(tl.int32)
        counts += tl.histogram(e, BLOCK_E, mask=(start + offs < num_pairs) & (e >= 0) & (e < E - DENSE_LAST))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E] end row of each counted expert's padded run
    total = tl.max(ends, axis=0)
    num_tokens = num_pairs // K
    dense_rows = (num_tokens + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # the dense expert's padded run
    if DENSE_LAST:
        total += dense_rows
    if me == E - DENSE_LAST:  # the dense expert's program (none when DENSE_LAST is 0: me < E)
        my_count = num_tokens
        my_end = total
        my_start = total - dense_rows
        for start in range(0, num_tokens, CHUNK):
            t = start + offs
            tl.store(pairs_ptr + my_start + t, t * K + K - 1, mask=t < num_tokens)
    else:
        mine = ex == me
        my_count = tl.sum(tl.where(mine, counts, 0), axis=0)
        my_end = tl.sum(tl.where(mine, ends, 0), axis=0)
        my_start = my_end - tl.sum(tl.where(mine, padded, 0), axis=0)
        seen = my_start  # next free row of my run
        for start in range(0, num_pairs, CHUNK):
            p = start + offs
            hit = (tl.load(ids_ptr + p, mask=p < num_pairs, other=-1) == me).to(tl.int32)
            dest = seen + tl.cumsum(hit, axis=0) - hit  # my pairs earlier in this chunk come first
            tl.store(pairs_ptr + dest, p, mask=hit > 0)
            seen += tl.sum(hit, axis=0)
    rows = tl.arange(0, BLOCK_M)
    tl.store(pairs_ptr + my_start + my_count + rows, num_pairs, mask=my_start + my_count + rows < my_end)
    for b in range(my_start // BLOCK_M, my_end // BLOCK_M):
        tl.store(block_expert_ptr + b, me)
    if me == 0:  # past the last run: sentinel rows, blocks of no expert
        for start in range(total, cap, CHUNK):
            tl.store(pairs_ptr + start + offs, num_pairs, mask=start + offs < cap)
        for start in range(total // BLOCK_M, cap // BLOCK_M, CHUNK):
            tl.store(block_expert_ptr + start + offs, -1, mask=start + offs < cap // BLOCK_M)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, dense_last: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs [cap] int32, block_expert [cap // block_m] int32); see moe_align_ref.
    dense_last: a promise that ids[:, -1] == num_experts - 1 (the fused shared expert) and no other slot
    holds it; the output is the same, the kernel just skips counting and matching that expert."""
    check(ids.dim() == 2 and ids.dtype in (torch.int32, torch.int64), "ids must be [T, k] ints")
    num_pairs = ids.numel()
    if num_pairs > MAX_PAIRS or num_experts > 1024:
        return moe_align_ref(ids, num_experts, block_m)
    cap = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    pairs = new_out((cap,), torch.int32, ids.device)
    block_expert = new_out((cap // block_m,), torch.int32, ids.device)
    block_e = next_pow2(num_experts - int(dense_last))  # the experts counted
    _align_kernel[(num_experts,)](ids.contiguous(), pairs, block_expert, num_pairs, cap, num_experts,
                                  BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=CHUNK,
                                  DENSE_LAST=int(dense_last), K=ids.shape[1], num_warps=4,
                                  **pdl_kw(ids.device, num_pairs))
    return pairs, block_expert
