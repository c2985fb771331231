"""The MoE router and moe_align in ONE launch for decode batches of at most MAX_T tokens (every worker rank).

At batch 1 the router path was three latency-bound launches a layer (H100 run 28: cuBLAS logits GEMM 5.4 us,
_route_kernel 2.0, moe_align 3.4; ~0.5 ms of a 4.0 ms GLM-4.7-Flash step). Here:
  program s of SPLITS: partial logits [T, E] over its K slice, x [T, H] . gate[:, slice]^T (bf16 tensor-core
  dots, fp32 accumulation: the products are exact, as in router_logits), stored to part[s];
  then bar.sync and a gpu-scope acq_rel arrival count (_common.arrival_counters, one counter); the LAST
  program to arrive sums part[0..SPLITS) in split order (.cg loads: L2, never a stale L1 line), resets the
  counter, runs moe_route's selection (_select: stores weights / ids) and aligns the T * k' pairs itself:
  a sort of (expert, pair) keys, a histogram of the experts, each pair's row = its sorted position + the
  padding of the expert runs before its own. One expert block holds a whole run (T <= BLOCK_M: an expert gets
  at most one pair a token), so block_expert has one write per used expert.
The last program works on SEL_T = next_pow2(T) token rows (not tl.dot's 16) and issues its SPLITS partial
loads unrolled. Output: moe_route's (weights, ids) and moe_align's (sorted_pairs, block_expert) for
fused_experts' BLOCK_M (fused_moe.expert_block_m; no layout where fused_experts takes its GEMV path), bit-equal
ids / layout to moe_route + moe_align when they pick the same experts; logits equal router_logits' up to fp32
summation order. H100 run 33 (bench/ab_step.py, FP8
GLM-4.7-Flash step, graph ms on / off): B 1 3.806 / 4.054, B 4 5.676 / 5.973, B 16 10.140 / 10.312.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import (FP8_DTYPE, INTERPRET, arrival_counters, check, fp8_grid_round, k_splits,
                                      new_out, next_pow2, pdl_enter, pdl_kw, splitk_arrive, splitk_sum)
from glmserve.kernels import fused_moe, rmsnorm
from glmserve.kernels.moe_route import _select, logits_tile, moe_route

# False: moe_route + moe_align (the A/B: bench/ab_step.py --switch route_align, bench/profile_step.py --route_align).
ENABLED = True
MAX_T = 16  # tokens: tl.dot's 16-row floor, and T <= BLOCK_M (fused_moe's smallest BLOCK_M is 16)
MAX_SPLITS = 32  # programs computing the logits; the last one sums MAX_SPLITS x [T, E] fp32 partials
FILL = 1024  # rows per store of the sentinel fill
# The last program's counter reset as a relaxed atomic: the default acq_rel one orders every later load and store
# of the select and align after its L2 round trip. Predicted ~0.5 us a launch at B 1. Same bits (tests). Measured
# off: H100 run 35 (bench/ab_step.py --switch route_relaxed, median graph ms on / off) B 1 3.803 / 3.803, B 256
# 18.867 / 18.685.
RELAXED_RESET = False


@triton.jit
def _route_align_kernel(
    x_ptr, gate_ptr, bias_ptr, w_ptr, ids_ptr, part_ptr, cnt_ptr, pairs_ptr, block_expert_ptr,
    T, E, H, x_st, scaling, cap, k_blocks_per_split,
    TOP_K: tl.constexpr, SHARED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, FILL: tl.constexpr, UPCAST: tl.constexpr, SEL_T: tl.constexpr,
    PDL: tl.constexpr = False, RELAXED_RESET: tl.constexpr = False, ALIGN: tl.constexpr = True,
    res_ptr=None, nw_ptr=None, y_ptr=None, s_ptr=None, q_ptr=None, qs_ptr=None, eps=0.0,
    NORM_IN: tl.constexpr = False, BLOCK_H: tl.constexpr = 1, QUANT: tl.constexpr = False,
    PRE_ROUND: tl.constexpr = False,
):
    """part: [SPLITS, T, E] fp32 workspace; cnt: one int32, 0 between launches. BLOCK_S >= E + SHARED (the
    slots aligned: the shared expert is slot E). ALIGN False: the last program selects only (no pairs layout).
    NORM_IN: x is the attention output and the router's input is s = x + res, y = RMSNorm(s) (weight nw, eps):
    every program computes its rows' rstd from whole rows (SEL_T x BLOCK_H) and normalises its K slice; program 0
    stores s, y and (QUANT) y's per-token FP8 form (q, qs), rows H apart, as rmsnorm.add_rms_norm(_fp8) would."""
    pdl_enter(PDL)
    split = tl.program_id(0)
    rt = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    row_ok = rt < T
    kb_lo = split * k_blocks_per_split
    kb_hi = tl.minimum(kb_lo + k_blocks_per_split, tl.cdiv(H, BLOCK_K))
    rstd_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    if NORM_IN:
        rs = tl.arange(0, SEL_T)
        rh = tl.arange(0, BLOCK_H)
        ok = (rs < T)[:, None] & (rh < H)[None, :]
        offs = rs[:, None].to(tl.int64) * x_st + rh[None, :]  # [SEL_T, BLOCK_H]
        xo = tl.load(x_ptr + offs, mask=ok, other=0.0)
        sv = (xo.to(tl.float32) + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(xo.dtype)
        sf = sv.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=1) / H + eps)  # [SEL_T], rmsnorm.norm_row's arithmetic
        if split == 0:  # the norm's outputs for the experts and the next layer's residual
            out_offs = rs[:, None].to(tl.int64) * H + rh[None, :]
            tl.store(s_ptr + out_offs, sv, mask=ok)
            w = tl.load(nw_ptr + rh, mask=rh < H, other=0.0).to(tl.float32)
            y = ((sf * rstd[:, None]).to(xo.dtype).to(tl.float32) * w[None, :]).to(xo.dtype)
            tl.store(y_ptr + out_offs, y, mask=ok)
            if QUANT:  # quant_fp8_per_token's arithmetic on y as stored
                yf = tl.where(ok, y.to(tl.float32), 0.0)
                scale = tl.maximum(tl.max(tl.abs(yf), axis=1) / 448.0, 1e-12)  # [SEL_T]
                tl.store(qs_ptr + rs, scale, mask=rs < T)
                q = tl.clamp(yf / scale[:, None], -448.0, 448.0)
                if PRE_ROUND:
                    q = fp8_grid_round(q)
                tl.store(q_ptr + out_offs, q.to(q_ptr.dtype.element_ty), mask=ok)
        # each dot row's rstd: [SEL_T] -> the [BLOCK_T] rows of tl.dot's tile (rows >= T: unused)
        rstd_t = tl.sum(tl.where(rt[:, None] == rs[None, :], rstd[None, :], 0.0), axis=1)
    acc = logits_tile(x_ptr, gate_ptr, rt, row_ok, x_st, E, H, kb_lo, kb_hi, BLOCK_T, BLOCK_E, BLOCK_K, UPCAST,
                      res_ptr, nw_ptr, rstd_t, NORM_IN)
    tile_p = part_ptr + rt[:, None] * E + e[None, :]
    tile_ok = row_ok[:, None] & (e < E)[None, :]
    tl.store(tile_p + split * T * E, acc, mask=tile_ok)
    if splitk_arrive(cnt_ptr) < SPLITS - 1:
        return  # not the last program
    # the last program: SEL_T (>= T) token rows from here on, not tl.dot's 16 (batch 1: one row's reductions)
    rt = tl.arange(0, SEL_T)
    row_ok = rt < T
    tile_p = part_ptr + rt[:, None] * E + e[None, :]
    tile_ok = row_ok[:, None] & (e < E)[None, :]
    # the partials summed in split order, the counter reset (RELAXED_RESET keeps the select's loads from waiting)
    logit = splitk_sum(tile_p, tile_ok, cnt_ptr, T, E, SPLITS, SEL_T, BLOCK_E, RELAXED_RESET)
    _, ids = _select(logit, rt, row_ok, bias_ptr, w_ptr, ids_ptr, E, scaling, TOP_K, SHARED, N_GROUP, TOPK_GROUP,
                     NORM, SEL_T, BLOCK_E, K_PAD)
    if not ALIGN:
        return

    # align: pair p = t * OUT_K + j; key = expert * 4096 + p (p < SEL_T * K_PAD <= 4096), ascending = pairs
    # grouped by expert, in pair order within one (moe_align's stable sort)
    OUT_K: tl.constexpr = TOP_K + SHARED
    num_pairs = T * OUT_K
    slots = tl.arange(0, K_PAD)[None, :]
    pair = rt[:, None] * OUT_K + slots  # [SEL_T, K_PAD]
    valid = row_ok[:, None] & (slots < OUT_K)
    key = tl.where(valid, ids.to(tl.int32) * 4096 + pair, 2147483647)
    key = tl.sort(tl.reshape(key, [SEL_T * K_PAD]))
    ok = key < 2147483647
    expert = tl.where(ok, key // 4096, 0)
    counts = tl.histogram(expert, BLOCK_S, mask=ok)  # [BLOCK_S] pairs of each slot
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded  # first row of each expert's run
    pad_before = starts - (tl.cumsum(counts, axis=0) - counts)  # padding rows of the runs before this expert's
    rows = tl.arange(0, SEL_T * K_PAD) + tl.gather(pad_before, expert, axis=0)  # sorted position + padding
    offs = tl.arange(0, FILL)
    for start in range(0, cap, FILL):  # every row the sentinel, every block no expert; then the real ones
        tl.store(pairs_ptr + start + offs, num_pairs, mask=start + offs < cap)
    for start in range(0, cap // BLOCK_M, FILL):
        tl.store(block_expert_ptr + start + offs, -1, mask=start + offs < cap // BLOCK_M)
    tl.debug_barrier()  # the fill's stores land before the overwrites below (same addresses, other threads)
    tl.store(pairs_ptr + rows, key % 4096, mask=ok)
    tl.store(block_expert_ptr + starts // BLOCK_M, tl.arange(0, BLOCK_S), mask=counts > 0)


# The post-attention norm (residual add + RMSNorm, and its FP8 form) inside this launch, for decode batches of at
# most NORM_MAX_T tokens whose rows fit one program's registers (next_pow2(T) * next_pow2(H) <= NORM_MAX_ELEMS): one
# launch a MoE layer fewer (the norm's, 2.3 us at B 1 under Nsight Compute, H100 run 34, plus its launch gap), for
# ~1 us more in every router program (whole rows loaded from L2 and reduced before the first dot). Same values as
# the norm's launch to fp32 sum order (the rstd's reduction is shaped differently). 0: off, the norm's own launch
# (bench/ab_step.py --switch route_norm).
NORM_MAX_T = 0
NORM_MAX_ELEMS = 8192


def add_rms_norm_route_align(x, residual, norm_weight, eps, quant, gate_weight, correction_bias, top_k, n_group,
                             topk_group, norm_topk_prob, scaling, shared_slot, num_slots, fp8):
    """shared.model.ops.add_rms_norm_route_align: (y, s, y_fp8) = rmsnorm.add_rms_norm(_fp8)(x, residual,
    norm_weight, eps) (quant: with y's per-token FP8 form, else None) and moe_route_align of y -> (y, s, y_fp8,
    weights, ids, aligned). One launch for T <= NORM_MAX_T tokens of bf16 contiguous rows (the kernel's NORM_IN),
    else the norm's launch, then moe_route_align's."""
    t, h = x.shape
    if (0 < t <= NORM_MAX_T and next_pow2(t) * next_pow2(h) <= NORM_MAX_ELEMS and x.is_contiguous()
            and residual.is_contiguous() and residual.shape == x.shape and norm_weight.shape == (h,)
            and x.dtype == residual.dtype == norm_weight.dtype == torch.bfloat16):
        out = _route_align(x, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                           shared_slot, num_slots, fp8, None, (residual, norm_weight.contiguous(), eps, quant))
        if out is not None:
            return out
    y, s, y_fp8 = rmsnorm.add_rms_norm_maybe_fp8(x, residual, norm_weight, eps, quant)
    return (y, s, y_fp8, *moe_route_align(y, gate_weight, correction_bias, top_k, n_group, topk_group,
                                          norm_topk_prob, scaling, shared_slot, num_slots, fp8))


def moe_route_align(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                    shared_slot, num_slots, fp8, align: bool | None = None):
    """shared.model.ops.moe_route_align: -> (weights [T, k'] fp32, ids [T, k'] int64, aligned), aligned =
    (sorted_pairs, block_expert, block_m) as moe_align lays them out for fused_experts over num_slots experts
    (fp8: its FP8 config), or None where this one launch does not apply (then moe_route's path; fused_experts
    aligns): more than MAX_T tokens, a gate or x that is not bf16, or no arrival counter (first use inside a
    CUDA graph capture). align None: unless fused_experts takes these tokens to its GEMV path (fused_moe.uses_gemv,
    which reads the ids and needs no layout); False: the one launch selects only and aligned is None."""
    out = _route_align(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                       shared_slot, num_slots, fp8, align)
    if out is None:
        return (*moe_route(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                           shared_slot), None)
    return out


def _route_align(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                 shared_slot, num_slots, fp8, align, norm=None):
    """The one launch, or None where it does not apply (moe_route_align's rules). norm: (residual, weight, eps,
    quant) -> hidden is the attention output, and the result is add_rms_norm_route_align's (y, s, y_fp8, ...)."""
    num_experts, h = gate_weight.shape
    x = hidden.reshape(-1, h)
    t = x.shape[0]
    out_k = top_k + int(shared_slot)
    num_pairs = t * out_k
    block_m = fused_moe.expert_block_m(x.device, num_pairs, num_slots, fp8)
    applies = (ENABLED and 0 < t <= min(MAX_T, block_m) and x.dtype == gate_weight.dtype == torch.bfloat16
               and x.stride(1) == 1 and (x.is_cuda or INTERPRET) and num_slots <= 1024)
    counter = arrival_counters(x.device, 1) if applies else None
    if counter is None:
        return None
    check(correction_bias.shape == (num_experts,), "correction bias must be [E]")
    check(num_experts % n_group == 0 and topk_group <= n_group, "bad grouping")
    check(num_slots >= num_experts + int(shared_slot), "num_slots must cover the shared slot")
    gate = gate_weight.contiguous()
    block_e = next_pow2(num_experts)
    block_k = 128 if num_experts <= 64 else 64 if num_experts <= 128 else 32  # gate tile <= 16 KB a K step
    k_blocks = triton.cdiv(h, block_k)
    splits, per_split = k_splits(k_blocks, MAX_SPLITS)
    align = not fused_moe.uses_gemv(t, fp8, x.device) if align is None else align
    cap = triton.cdiv(num_pairs + num_slots * (block_m - 1), block_m) * block_m if align else block_m
    weights = new_out((t, out_k), torch.float32, x.device)
    ids = new_out((t, out_k), torch.int64, x.device)
    part = new_out((splits, t, num_experts), torch.float32, x.device)
    pairs = new_out((cap,), torch.int32, x.device)  # moe_align's bound (one block's worth, unused, if not align)
    block_expert = new_out((cap // block_m,), torch.int32, x.device)
    norm_args, normed = {}, ()
    if norm is not None:  # the norm's outputs [T, H] (rows H apart) and its FP8 form
        residual, norm_weight, eps, quant = norm
        y, s = new_out((t, h), x.dtype, x.device), new_out((t, h), x.dtype, x.device)
        q = new_out((t, h), FP8_DTYPE, x.device) if quant else y
        qs = new_out((t, 1), torch.float32, x.device) if quant else y
        norm_args = dict(res_ptr=residual, nw_ptr=norm_weight, y_ptr=y, s_ptr=s, q_ptr=q, qs_ptr=qs, eps=float(eps),
                         NORM_IN=True, BLOCK_H=next_pow2(h), QUANT=bool(quant), PRE_ROUND=INTERPRET)
        normed = (y, s, (q, qs) if quant else None)
    _route_align_kernel[(splits,)](
        x, gate, correction_bias.float().contiguous(), weights, ids, part, counter, pairs, block_expert,
        t, num_experts, h, x.stride(0), float(scaling), cap, per_split,
        TOP_K=top_k, SHARED=int(shared_slot), N_GROUP=n_group, TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob),
        BLOCK_T=16, BLOCK_E=block_e, BLOCK_K=block_k, K_PAD=next_pow2(out_k), SPLITS=splits,
        BLOCK_S=next_pow2(num_slots), BLOCK_M=block_m, FILL=FILL, UPCAST=INTERPRET, SEL_T=next_pow2(t), num_warps=4,
        RELAXED_RESET=RELAXED_RESET, ALIGN=align, **norm_args, **pdl_kw(x.device, t))
    return (*normed, weights, ids, (pairs, block_expert, block_m) if align else None)
