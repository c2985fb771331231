"""Fused routed-expert MLP: gate_up GEMM -> SiLU-mul -> down GEMM -> weighted combine, BF16 or FP8.
Triton on CUDA, torch reference beside; every worker rank (MoE layers; I is this rank's TP slice).

  out[t] = sum_j w[t, j] * W2_e (silu(W1_e x_t) * W3_e x_t),  e = ids[t, j]
Pairs (t, j) are sorted by expert and padded per expert to BLOCK_M rows (kernels.moe_align: one launch at decode sizes),
so each program multiplies BLOCK_M rows that share one expert's weights: a grouped GEMM that reads
each used expert's weights once per M block. FP8 (GLM compressed-tensors format): e4m3 weights with a
scale per output row (w13_scale [E, 2I, 1], w2_scale [E, H, 1]); activations are quantized per token
on the fly (x per token, the SiLU-mul output per pair, fused into kernels.act_quant.silu_and_mul_fp8).
Bytes at decode: the used experts' weights (3 * H * I each, once per M block) dominate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import (FP8_DTYPE, INTERPRET, arrival_counters, check, dot_in, dot_precision, gpu_name,
                                      new_out, sm_count, pdl_enter, pdl_kw)
from glmserve.kernels.act_quant import quant_fp8_per_token, silu_and_mul, silu_and_mul_fp8
from glmserve.kernels import fp8_gemv
from glmserve.kernels.fp8_gemv import moe_gemv
from glmserve.kernels.moe_align import moe_align  # one launch at decode sizes, torch above
from glmserve.kernels import rmsnorm


def fused_experts_ref(x, w13, w2, weights, ids, w13_scale=None, w2_scale=None, shared_last=False,
                      x_fp8=None) -> torch.Tensor:
    """Loop over experts in fp32 (weights dequantized, activations not quantized); shared_last and x_fp8
    change nothing."""
    if w13_scale is not None:
        w13 = w13.float() * w13_scale.float()
        w2 = w2.float() * w2_scale.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        tok = token_of[sel]
        gate, up = (x[tok].float() @ w13[e].float().t()).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up) @ w2[e].float().t()
        out.index_add_(0, tok, h * weights.reshape(-1)[sel, None].float())
    return out.to(x.dtype)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, w_ptr, pairs_ptr, block_expert_ptr,
    num_pairs, N, K, a_sm, b_se, b_sn, c_sm, bs_se,
    A_DIV: tl.constexpr, FP8: tl.constexpr, MUL_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr = "tf32",
    PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
):
    """c[pair, :] = (A[pair // A_DIV] . B[e]^T) (* scales) (* w[pair]) for the BLOCK_M pairs of one block.
    EARLY: the block's pairs load beside its expert id (not after the id's check), and the epilogue's scales and
    weights load before the K loop, so neither waits on a dependent global round trip (same math, same bits)."""
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EARLY:  # one round trip for both: the pairs' address does not depend on the expert
        pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    if not EARLY:
        pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = (pairs // A_DIV).to(tl.int64)
    if EARLY:  # the epilogue's operands, in flight while the K loop streams B
        if FP8:
            sb = tl.load(bs_ptr + expert.to(tl.int64) * bs_se + rn, mask=rn < N, other=0.0)
            sa = tl.load(as_ptr + a_rows, mask=row_ok, other=0.0)
        if MUL_WEIGHT:
            wt = tl.load(w_ptr + pairs, mask=row_ok, other=0.0)
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + a_rows[:, None] * a_sm + rk[None, :]
    b_p = b_ptr + expert.to(tl.int64) * b_se + rn[None, :].to(tl.int64) * b_sn + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kb * BLOCK_K
        a = tl.load(a_p, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_p, mask=(rn[None, :] < N) & k_ok[:, None], other=0.0)
        if FP8:  # full-precision accumulation every BLOCK_K (sm_90 fp8 MMA accumulates imprecisely)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(dot_in(a, UPCAST), dot_in(b, UPCAST), acc, input_precision=PREC)
        a_p += BLOCK_K
        b_p += BLOCK_K
    if FP8:
        if not EARLY:
            sb = tl.load(bs_ptr + expert.to(tl.int64) * bs_se + rn, mask=rn < N, other=0.0)
            sa = tl.load(as_ptr + a_rows, mask=row_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if MUL_WEIGHT:
        if not EARLY:
            wt = tl.load(w_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * wt[:, None]
    c_p = c_ptr + pairs.to(tl.int64)[:, None] * c_sm + rn[None, :]
    tl.store(c_p, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (rn[None, :] < N))


@triton.jit
def _sum_slots_kernel(src_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, :] = sum_j src[t * TOP_K + j, :] in fp32, one rounding to out's dtype."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(TOP_K):
        acc += tl.load(src_ptr + (t * TOP_K + j) * H + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


# Launch configs as data: (gpu, "decode" | "prefill", "bf16" | "fp8") -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# "decode" = at most 32 pairs per expert on average; untuned starting points (bench/KERNEL_NOTES.md).
CONFIGS: dict[tuple[str, str, str], tuple[int, int, int, int, int]] = {
    ("default", "decode", "bf16"): (16, 64, 128, 4, 4),
    ("default", "decode", "fp8"): (16, 128, 128, 4, 4),
    # H100 run 17 (bench.decode_sweep --only moe, Flash shapes, L2-cold CUDA graphs): BLOCK_K 256 / 3 stages /
    # BLOCK_N 64 beat the default at every decode batch, w13 + w2 per layer: B 1 28.4 -> 26.3 us, B 64
    # 218.5 -> 210.6, B 256 233.7 -> 223.7 (0.99 / 0.94 of copy at B 64 / 256)
    ("H100", "decode", "fp8"): (16, 64, 256, 4, 3),
    ("default", "prefill", "bf16"): (64, 128, 64, 4, 3),
    ("default", "prefill", "fp8"): (64, 128, 128, 4, 3),
}
_CPU_CONFIG = (16, 32, 32, 4, 1)


def _config(device, num_pairs: int, num_experts: int, fp8: bool) -> tuple[int, int, int, int, int]:
    """Table entry, with BLOCK_M sized to the mean pairs per expert (x1.5 headroom) when that is
    under 64: a second M block of the same expert would read its weights again (decode is memory-bound)."""
    name = gpu_name(device)
    if name == "cpu":
        return _CPU_CONFIG
    phase = "decode" if num_pairs <= 32 * num_experts else "prefill"
    key = (phase, "fp8" if fp8 else "bf16")
    cfg = CONFIGS.get((name, *key), CONFIGS[("default", *key)])
    mean = num_pairs / max(1, num_experts)
    if mean < 64:
        cfg = (min(64, max(16, triton.next_power_of_2(int(1.5 * mean) + 1))), *cfg[1:])
    return cfg


def expert_block_m(device, num_pairs: int, num_slots: int, fp8: bool) -> int:
    """The BLOCK_M fused_experts aligns its pairs to (for a router that aligns them itself: moe_route_align)."""
    return _config(device, num_pairs, num_slots, fp8)[0]


_SMEM_BUDGET = 200 * 1024  # bytes; sm_90 allows 227 KB per block, keep headroom for the epilogue


def _fit_smem(cfg: tuple[int, int, int, int, int], elem_bytes: int) -> tuple[int, int, int, int, int]:
    """The table is sized for 1- and 2-byte operands: for wider ones (fp32 models) drop pipeline stages,
    then halve BLOCK_K, until the A and B tiles of every stage fit in shared memory."""
    bm, bn, bk, warps, stages = cfg
    while stages * (bm * bk + bk * bn) * elem_bytes > _SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    return bm, bn, bk, warps, stages


MIN_BLOCK_N = 32
# per GPU: narrowing below this lost in the sweeps (H100 run 17: 64 -> 32 at B 1, w13 15.6 -> 16.9 us)
NARROW_FLOOR: dict[str, int] = {"H100": 64}


def _narrow_n(bn: int, n: int, active_m: int, sms: int, floor: int = MIN_BLOCK_N) -> int:
    """BLOCK_N halved (not below `floor`: MIN_BLOCK_N, or the GPU's NARROW_FLOOR) until the blocks that do work fill every SM twice: at
    decode few experts are active (4 at batch 1), and 4 x 2048/128 = 64 programs left half of an
    H200's 132 SMs idle on a memory-bound GEMM (14 us for 4 experts' 12.6 MB of FP8 weights)."""
    while bn > floor and active_m * triton.cdiv(n, bn) < 2 * sms:
        bn //= 2
    return bn


# Launch only the expert blocks that can hold pairs (used_blocks); False: all of moe_align's blocks (the A/B,
# bench/profile_step.py --moe_grid all). H100 run 30, one run with the other new paths on: B 1 4.29-4.33 ms
# with it against 4.37 without.
BOUND_GRID = True


def used_blocks(num_blocks: int, num_pairs: int, block_m: int, num_experts: int) -> int:
    """How many of moe_align's num_blocks blocks can hold pairs: the runs are packed from block 0, and
    sum over active experts of cdiv(count, BLOCK_M) <= num_pairs // BLOCK_M + active experts
    (<= min(E, num_pairs)). Launching only these: at batch 1, 5 pairs (4 routed + shared) in 62 blocks of 16,
    the grid was 62 x N blocks of which 57 x N only read block_expert = -1 and exit (2,976 programs for 240
    with work in GLM-4.7-Flash's gate_up), each still a CTA to schedule."""
    return min(num_blocks, num_pairs // block_m + min(num_experts, num_pairs))


# The block's pairs load beside its expert id and the epilogue's scales / weights before the K loop
# (_moe_gemm_kernel's EARLY). Reason (H200 run 19, the MLA kernel): a program pays its dependent global round
# trips on top of its streaming, and at B 1 an MoE program streams only 48-128 KB (the w2 launch runs at 0.45-0.52
# of the copy ceiling for every tile config, H100 run 17). Predicted: -1 to -1.5 us a launch at B 1 (~0.1 ms a
# step). Same bits either way (tests). Measured off: H100 run 35 (bench/ab_step.py --switch moe_early, FP8 Flash
# step, median graph ms on / off) B 1 3.903 / 3.882, B 256 18.876 / 18.766.
EARLY_LOADS = False


def _gemm(a, a_scale, b, b_scale, c, weights, pairs, block_expert, num_pairs, a_div, cfg, mul_weight,
          narrow: bool = True) -> None:
    """One grouped GEMM launch; narrow=False keeps cfg's BLOCK_N as given (bench/decode_sweep.py)."""
    bm, bn, bk, warps, stages = _fit_smem(cfg, max(a.element_size(), b.element_size()))
    n, k = b.shape[1], b.shape[2]
    if b.is_cuda and narrow:  # blocks with work: at most one per pair, at most one per expert at decode sizes
        bn = _narrow_n(bn, n, min(block_expert.numel(), num_pairs, b.shape[0]), sm_count(b.device),
                       NARROW_FLOOR.get(gpu_name(b.device), MIN_BLOCK_N))
    blocks = used_blocks(block_expert.numel(), num_pairs, bm, b.shape[0]) if BOUND_GRID else block_expert.numel()
    fp8 = b.dtype == FP8_DTYPE
    _moe_gemm_kernel[(blocks, triton.cdiv(n, bn))](
        a, b, c, a_scale if fp8 else c, b_scale if fp8 else c, weights, pairs,
        block_expert, num_pairs, n, k, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        b_scale.stride(0) if fp8 else 0,
        A_DIV=a_div, FP8=fp8, MUL_WEIGHT=mul_weight, UPCAST=INTERPRET and not fp8,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=dot_precision(a.dtype), num_warps=warps, num_stages=stages,
        EARLY=EARLY_LOADS, **pdl_kw(b.device, num_pairs),
    )


# The SiLU-mul inside the MoE GEMMs (gate_up's epilogue storing silu(gate) * up, the down GEMM quantizing its
# bf16 input) lost in the step both ways it was built, and was removed (bench/KERNEL_NOTES.md v12, v14; code at
# commit 9ce9879): per (pair, BLOCK_K group) scales +4.7 ms at B 256 (H100 run 30); per-pair scales from per-block
# amaxes, bit-equal to this path, +0.73 ms at B 1 and +1.39 ms at B 256 (H200 run 16). Three launches: gate_up
# GEMM, silu_and_mul(_fp8), down GEMM.


# FP8 expert GEMMs of T <= GEMV_MAX_T tokens on CUDA: kernels/fp8_gemv.py's moe_gemv (one program a (pair, N block)
# over all of K, no pair alignment, no MMA tile padded to 16 rows) for both GEMMs. Written for B 1-4, where the two
# GEMMs a layer ran at 58 % / 42 % of DRAM peak (H100 run 40's Nsight Compute, B 1: 16.7 / 11.2 us for 5 experts'
# 31.5 / 15.7 MB). H100 runs 42-43, median graph ms on / off: alone B 1 3.777 / 3.717; with fp8_gemv.FUSED_ACT (the
# down GEMV forms its SiLU-mul: no SiLU launch) B 1 3.554 / 3.657 (faster in all 3 rounds), B 2 -0.025, B 4 +0.161
# (the grouped MMA GEMMs reach ~0.8 of copy there): T 1 only. 0: off (bench/ab_step.py --switch moe_gemv sets 4 / 0).
GEMV_MAX_T = 1


def uses_gemv(t: int, fp8: bool, device: torch.device) -> bool:
    """Whether fused_experts runs T tokens' expert GEMMs as moe_gemv launches (which need no pair alignment)."""
    return fp8 and device.type == "cuda" and t <= GEMV_MAX_T


def _row_scales(scale: torch.Tensor | None) -> torch.Tensor | None:
    """[S, N, 1] per-row weight scales -> [S, N] fp32 contiguous (None stays None)."""
    return None if scale is None else scale.reshape(scale.shape[0], -1).float().contiguous()


def fused_experts(x, w13, w2, weights, ids, w13_scale=None, w2_scale=None, shared_last=False,
                  x_fp8=None, keep_slots=False, aligned=None) -> torch.Tensor:
    """shared.model.ops signature. x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights [T, k]; ids [T, k].
    shared_last: ids[:, -1] is expert E - 1 for every token (the fused shared expert; moe_align skips counting it).
    x_fp8: x's per-token FP8 form (q [T, H], scale [T, 1]) when its producer made it (FP8 experts only).
    keep_slots: return the down GEMM's weighted per-pair rows as [T, k, H] (the slot form; the next
    add_rms_norm kernel sums them) instead of launching the slot sum.
    aligned: (sorted_pairs, block_expert, block_m) of these ids from the router (moe_route_align), used when
    block_m is this launch's BLOCK_M; else the pairs are aligned here (moe_align)."""
    t, h = x.shape
    num_experts, two_i, _ = w13.shape
    fp8 = w13.dtype == FP8_DTYPE
    check(w13.shape[2] == h and w2.shape == (num_experts, h, two_i // 2), "expert weight shapes")
    check(w13.stride(2) == 1 and w2.stride(2) == 1 and x.stride(1) == 1, "K dims must be contiguous")
    check(ids.shape == weights.shape and ids.shape[0] == t, "ids / weights must be [T, k]")
    check(not fp8 or (w13_scale is not None and w2_scale is not None and w2.dtype == FP8_DTYPE), "fp8 needs scales")
    top_k = ids.shape[1]
    num_pairs = t * top_k
    if t == 0:
        return new_out((t, top_k, h) if keep_slots else (t, h), x.dtype, x.device)
    if uses_gemv(t, fp8, x.device):
        return _experts_gemv(x, w13, w2, weights, ids, w13_scale, w2_scale, x_fp8, keep_slots)
    cfg = _config(x.device, num_pairs, num_experts, fp8)
    if aligned is not None and aligned[2] == cfg[0]:
        pairs, block_expert = aligned[0], aligned[1]
    else:
        pairs, block_expert = moe_align(ids, num_experts, cfg[0], dense_last=shared_last)
    flat_w = weights.reshape(-1).float().contiguous()
    down = new_out((num_pairs, h), x.dtype, x.device)
    xq, xs = (x_fp8 if x_fp8 is not None else quant_fp8_per_token(x)) if fp8 else (x, None)
    s13, s2 = _row_scales(w13_scale), _row_scales(w2_scale)
    gate_up = new_out((num_pairs, two_i), x.dtype, x.device)
    _gemm(xq, xs, w13, s13, gate_up, flat_w, pairs, block_expert, num_pairs, top_k, cfg, False)
    act, act_s = silu_and_mul_fp8(gate_up) if fp8 else (silu_and_mul(gate_up), None)
    _gemm(act, act_s, w2, s2, down, flat_w, pairs, block_expert, num_pairs, 1, cfg, True)
    return _combine(down, t, top_k, h, keep_slots)


# The next layer's input norm (the slot sum, the residual add, RMSNorm and its FP8 form: rmsnorm.add_rms_norm_fp8 on
# the slot form) done by the down GEMV's last program of each token (fp8_gemv.moe_gemv's next_norm), for
# T <= NEXT_NORM_MAX_T tokens on the GEMV path at TP 1: one launch a MoE layer fewer, for a serial tail (~20 KB of
# slot rows from L2, one row's norm) after the GEMV's programs and ~1,300 arrival counts on one counter. Same
# arithmetic as the norm's launch (bit-equal under the interpreter; to the rstd's fp32 sum order on a GPU, where
# the reduction runs over 4 warps, not 8). 0: off, the norm's own launch (bench/ab_step.py --switch moe_next_norm).
NEXT_NORM_MAX_T = 0


def fused_experts_norm(x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, aligned, residual,
                       norm_weight, eps, quant):
    """shared.model.ops.fused_experts_norm: the experts' slot form (fused_experts(keep_slots=True)), then the next
    layer's input norm of it: -> (y, s, y_fp8) = rmsnorm.add_rms_norm(_fp8)(slots, residual, norm_weight, eps)
    (quant: with y's per-token FP8 form, else None). One launch fewer where the down GEMV does the norm
    (NEXT_NORM_MAX_T)."""
    t, h = x.shape
    fp8 = w13.dtype == FP8_DTYPE
    if (0 < t <= NEXT_NORM_MAX_T and uses_gemv(t, fp8, x.device) and residual.shape == (t, h)
            and residual.is_contiguous() and residual.dtype == x.dtype == norm_weight.dtype
            and norm_weight.shape == (h,) and h <= 16384):
        counters = arrival_counters(x.device, t)
        if counters is not None:
            return _experts_gemv(x, w13, w2, weights, ids, w13_scale, w2_scale, x_fp8, True,
                                 (counters, residual, norm_weight.contiguous(), eps, quant))
    slots = fused_experts(x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, True, aligned)
    return rmsnorm.add_rms_norm_maybe_fp8(slots, residual, norm_weight, eps, quant)


def _experts_gemv(x, w13, w2, weights, ids, w13_scale, w2_scale, x_fp8, keep_slots: bool, next_norm=None):
    """fused_experts for few tokens on FP8 experts: the two GEMMs as moe_gemv launches (checked arguments). With
    fp8_gemv.FUSED_ACT (16-bit x) the GEMVs quantize their own inputs: x per token when no norm made its FP8 form,
    and the down GEMV forms silu(gate) * up from the gate_up rows (no quant or SiLU launch; the same e4m3 operands,
    sums in another order on the GPU: see fp8_gemv.FUSED_ACT). next_norm: moe_gemv's, for the down GEMV (the slot
    form) -> (y, s, y_fp8) of the next layer's input norm instead of the experts' output."""
    t, h = x.shape
    top_k = ids.shape[1]
    flat_w, flat_ids = weights.reshape(-1).float().contiguous(), ids.reshape(-1).contiguous()
    fused = fp8_gemv.FUSED_ACT and x.dtype in (torch.bfloat16, torch.float16)
    if x_fp8 is not None:
        xq, xs, x_mode = *x_fp8, fp8_gemv.A_FP8
    elif fused:
        xq, xs, x_mode = x, None, fp8_gemv.A_QUANT
    else:
        xq, xs, x_mode = *quant_fp8_per_token(x), fp8_gemv.A_FP8
    gate_up = new_out((t * top_k, w13.shape[1]), x.dtype, x.device)
    moe_gemv(xq, xs, w13, _row_scales(w13_scale), gate_up, flat_w, flat_ids, top_k, False, a_mode=x_mode)
    act, act_s, act_mode = (gate_up, None, fp8_gemv.A_SILU) if fused else (*silu_and_mul_fp8(gate_up), fp8_gemv.A_FP8)
    down = moe_gemv(act, act_s, w2, _row_scales(w2_scale), new_out((t * top_k, h), x.dtype, x.device), flat_w,
                    flat_ids.view(t, top_k) if next_norm is not None else flat_ids, 1, True, a_mode=act_mode,
                    next_norm=next_norm)
    if next_norm is not None:
        return down[1]
    return _combine(down, t, top_k, h, keep_slots)


def _combine(down: torch.Tensor, t: int, top_k: int, h: int, keep_slots: bool) -> torch.Tensor:
    """down [T * k, H] weighted per-pair rows -> [T, k, H] (keep_slots) or their sum [T, H]."""
    if keep_slots:
        return down.view(t, top_k, h)
    out = new_out((t, h), down.dtype, down.device)
    block_h = min(1024, triton.next_power_of_2(h))
    _sum_slots_kernel[(t, triton.cdiv(h, block_h))](down, out, h, TOP_K=top_k, BLOCK_H=block_h, num_warps=4,
                                                    **pdl_kw(down.device, t))
    return out
