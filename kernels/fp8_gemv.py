"""Per-channel W8A8 FP8 GEMVs for decode's smallest batches, every worker rank of an FP8 checkpoint, on CUDA:
kernels.fp8_gemm.fp8_gemm routes M <= fp8_gemm.GEMV_MAX_M here (fp8_gemv), kernels.fused_moe.fused_experts its
expert GEMMs of T <= fused_moe.GEMV_MAX_T tokens (moe_gemv: one program a (token, expert) pair and N block).

  y [M, N] = (A_q [M, K] . W_q [N, K]^T) * s_a [M, 1] * s_w [N, 1] (+ bias [N]), bf16 (or fp32) out
Program (row m, N block): its [BLOCK_N, K] weight slice comes in K_CHUNKS unrolled [BLOCK_N, BLOCK_K] loads (one
chunk for K <= 2048), each multiplied by the A row in fp32 (fp8 x fp8 products are exact in fp32) and reduced to
[BLOCK_N] inside the program (_rows_dot). Against the MMA kernel at M 1: no padding of M to a 16-row MMA tile, no
software-pipeline prologue, and K is never split across programs, so no fp32 partials, arrival counters or
finisher round trips. Rows of one N block are adjacent programs (m is grid dim 0), so M > 1 reads each weight
slice from DRAM about once and from L2 after. Sums run in a different order than the MMA kernel's: the same
values to fp32 rounding, not the same bits. A_MODE (below): A as e4m3 rows with scales, or 16-bit rows the program
quantizes per row itself (optionally forming silu(gate) * up first): the separate quantizing launch's operand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import (FP8_DTYPE, INTERPRET, check, fp8_grid_round, new_out, next_pow2, pdl_enter,
                                      pdl_kw, sm_count, splitk_arrive)
from glmserve.kernels.rmsnorm import norm_row


# A_MODE: what the kernels' A operand is. A_FP8: e4m3 rows with per-row scales (the quantized activation). A_QUANT:
# 16-bit rows [R, K] the program quantizes per row itself, as act_quant.quant_fp8_per_token does (no quant launch
# before the GEMV). A_SILU: 16-bit rows [R, 2K] = [gate | up] (the gate_up GEMM's output) from which the program forms
# silu(gate) * up and quantizes it per row, as act_quant.silu_and_mul_fp8 does (no SiLU launch before the down GEMV).
# A_NORM: 16-bit rows [R, K] (K <= one chunk) the program RMS-normalises (norm weight [K], eps) and quantizes per row,
# as rmsnorm.rms_norm_fp8 does (no norm launch before the GEMV: q_b's input, q_a's norm in GLM-4.7-Flash's MLA).
# Every program of a row recomputes the row's scale (one pass of amax over its K chunks, from L1 / L2), so the e4m3
# operand it multiplies is the separate kernel's, bit for bit (A_NORM: to the norm's sum-of-squares order), and the
# GEMV's result is the two-launch path's to fp32 sum order (FUSED_ACT).
A_FP8, A_QUANT, A_SILU, A_NORM = 0, 1, 2, 3


@triton.jit
def _a_values(a_p, c, k_ok, K, nw_p, rstd, A_MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chunk c of A's row (a_p: [1 or BLOCK_N, BLOCK_K] pointers to chunk 0; k_ok its [1, BLOCK_K] column mask) in
    fp32 before any quantization: the stored values (A_FP8, A_QUANT), or (A_SILU) silu(gate) * up with gate at
    a_p and up K further, rounded to the row's dtype where act_quant's SiLU kernel rounds (silu(gate), the product),
    or (A_NORM) RMSNorm's output with rstd and the norm weight at nw_p (a_p's shape), rounded as rmsnorm's norm_row
    rounds it (x * rstd, then the product with the weight)."""
    x = tl.load(a_p + c * BLOCK_K, mask=k_ok, other=0.0)
    if A_MODE == 3:
        dt = a_p.dtype.element_ty
        normed = (x.to(tl.float32) * rstd).to(dt).to(tl.float32)
        return (normed * tl.load(nw_p + c * BLOCK_K, mask=k_ok, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    if A_MODE == 2:
        dt = a_p.dtype.element_ty
        g = x.to(tl.float32)
        u = tl.load(a_p + K + c * BLOCK_K, mask=k_ok, other=0.0).to(tl.float32)
        return ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _rstd(a_p, K, eps, BLOCK_K: tl.constexpr):
    """A_NORM: 1 / sqrt(mean(x^2) + eps) of the row's one chunk, as norm_row computes it (one sum over the row; the
    rows of an [A_ROWS, BLOCK_K] pointer tile are the same row, so their sums are equal: max picks one)."""
    xf = tl.load(a_p, mask=(tl.arange(0, BLOCK_K) < K)[None, :], other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.max(tl.sum(xf * xf, axis=1), axis=0) / K + eps)


@triton.jit
def _a_scale(a_p, K, nw_p, rstd, A_MODE: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr):
    """The row's per-token FP8 scale max(amax / 448, 1e-12) over its K values (A_QUANT, A_SILU, A_NORM), as
    act_quant's and rmsnorm's kernels compute it (a max is exact in any order)."""
    rk = tl.arange(0, BLOCK_K)
    for c in tl.static_range(K_CHUNKS):  # elementwise over the chunks, then one reduction across the program
        h = tl.abs(_a_values(a_p, c, (rk < K - c * BLOCK_K)[None, :], K, nw_p, rstd, A_MODE, BLOCK_K))
        if c == 0:
            amax = h
        else:
            amax = tl.maximum(amax, h)
    return tl.maximum(tl.max(tl.max(amax, axis=1), axis=0) / 448.0, 1e-12)


@triton.jit
def _a_operand(a_p, c, k_ok, K, scale, nw_p, rstd, A_MODE: tl.constexpr, BLOCK_K: tl.constexpr,
               PRE_ROUND: tl.constexpr):
    """Chunk c of the e4m3 operand as fp32: loaded (A_FP8), or quantized here by `scale` with act_quant's
    arithmetic (A_QUANT, A_NORM: x / s as quant_fp8_per_token and norm_row; A_SILU: h * (1 / s) as
    silu_and_mul_fp8), so the e4m3 values are theirs."""
    h = _a_values(a_p, c, k_ok, K, nw_p, rstd, A_MODE, BLOCK_K)
    if A_MODE == 0:
        return h
    if A_MODE == 2:
        q = tl.clamp(h * (1.0 / scale), -448.0, 448.0)
    else:
        q = tl.clamp(h / scale, -448.0, 448.0)
    if PRE_ROUND:
        q = fp8_grid_round(q)
    return q.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def _w_cols(rk, A_MODE: tl.constexpr):
    """The weight tile's column offsets rk; when A is 16-bit (A_QUANT, A_SILU, A_NORM) written so the compiler sees
    them contiguous in runs of 8 only (tl.max_contiguous's hint does not survive to the layout pass): the weight
    loads then take 8 e4m3 (8 bytes) a thread, the register layout of a 16-bit A row's 16-byte loads, so the
    products need no layout conversion (offline sm_90, o_proj's 3-chunk A_QUANT program: 7 barriers and 32 B of
    shared memory; with 16 e4m3 a thread every chunk's A went through shared memory: 23 and 4 KB)."""
    if A_MODE == 0:
        return rk
    return (rk // 8) * 8 + rk % 8


@triton.jit
def _rows_dot(w_p, a_p, n_ok, K, scale, nw_p, rstd, A_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr, PRE_ROUND: tl.constexpr):
    """[BLOCK_N] fp32: sum over k < K of w[n, k] * a[k]. w_p [BLOCK_N, BLOCK_K]: the weight rows' chunk-0 pointers
    (K contiguous); a_p [A_ROWS, BLOCK_K]: the A row's chunk-0 pointers, one row (a_rows: in the weight tile's
    register layout, each thread its own 16-byte piece once) or the row in every tile row (A_ROWS = BLOCK_N; a
    [BLOCK_K] vector would reach the tile's layout through shared memory and barriers). A chunk is one
    [BLOCK_N, BLOCK_K] load reduced to [BLOCK_N] (in the thread, its warp, then across warps); the first chunk's sum
    starts the accumulator in that reduced layout (a tl.zeros accumulator would need a layout conversion through
    shared memory every chunk). scale: A's per-row scale when the program quantizes A (A_QUANT, A_SILU, A_NORM);
    nw_p, rstd: A_NORM's weight pointers and the row's rstd."""
    rk = tl.arange(0, BLOCK_K)
    for c in tl.static_range(K_CHUNKS):
        k_ok = rk < K - c * BLOCK_K
        w = tl.load(w_p + c * BLOCK_K, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = _a_operand(a_p, c, k_ok[None, :], K, scale, nw_p, rstd, A_MODE, BLOCK_K, PRE_ROUND)
        part = tl.sum(w.to(tl.float32) * a, axis=1)
        if c == 0:
            acc = part
        else:
            acc += part
    return acc


@triton.jit
def _fp8_gemv_kernel(
    a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, nw_ptr, N, K, a_sm, w_sn, c_sm, as_sm, ws_sn, eps,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
    PDL: tl.constexpr = 0, A_MODE: tl.constexpr = 0, A_ROWS: tl.constexpr = 0, PRE_ROUND: tl.constexpr = False,
):
    """Program (row m, N block): c[m, n] = (A[m] . W[n]) * s_a[m] * s_w[n] (+ bias[n]) for BLOCK_N columns;
    A_QUANT / A_SILU / A_NORM: A[m] and s_a[m] from the 16-bit row (as_ptr unread; A_NORM: the norm weight at
    nw_ptr, eps)."""
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    sw = tl.load(ws_ptr + rn * ws_sn, mask=n_ok, other=0.0)
    w_p = w_ptr + rn.to(tl.int64)[:, None] * w_sn + _w_cols(rk, A_MODE)[None, :]
    a_offs = tl.zeros([A_ROWS, 1], dtype=tl.int32) + rk[None, :]
    a_p = a_ptr + m * a_sm + a_offs
    nw_p = nw_ptr + a_offs
    rstd = 1.0
    if A_MODE == 3:
        rstd = _rstd(a_p, K, eps, BLOCK_K)
    if A_MODE == 0:
        sa = tl.load(as_ptr + m * as_sm)
    else:
        sa = _a_scale(a_p, K, nw_p, rstd, A_MODE, BLOCK_K, K_CHUNKS)
    y = _rows_dot(w_p, a_p, n_ok, K, sa, nw_p, rstd, A_MODE, BLOCK_N, BLOCK_K, K_CHUNKS, PRE_ROUND) * sa * sw
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + m * c_sm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _moe_gemv_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, w_ptr, ids_ptr, N, K, a_sm, b_se, b_sn, c_sm, bs_se,
    A_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_CHUNKS: tl.constexpr, PDL: tl.constexpr = 0, A_MODE: tl.constexpr = 0, A_ROWS: tl.constexpr = 0,
    PRE_ROUND: tl.constexpr = False,
    cnt_ptr=None, res_ptr=None, nw_ptr=None, y_ptr=None, s_ptr=None, q_ptr=None, qs_ptr=None, eps=0.0,
    NEXT_NORM: tl.constexpr = False, SLOTS: tl.constexpr = 1, BLOCK_H: tl.constexpr = 1,
    QUANT: tl.constexpr = False, NORM_PRE_ROUND: tl.constexpr = False,
):
    """Program (pair, N block): c[pair, n] = (A[pair // A_DIV] . B[e, n]) * s_a[pair // A_DIV] * s_b[e, n]
    (* w[pair]), e = ids[pair]: fused_moe._moe_gemm_kernel's product for one (token, expert) pair, FP8 only.
    A_QUANT / A_SILU: A and s_a from the 16-bit row (as_ptr unread). The epilogue's scales load before the dot.
    NEXT_NORM (the down GEMV, c = the slot form [T * SLOTS, N]): then the program counts itself on its token's
    arrival counter (cnt [T], 0 between launches); the token's last program (of SLOTS x N blocks) sums the SLOTS
    rows (from L2), adds the residual row and runs the next layer's input norm: rmsnorm.add_rms_norm(_fp8)'s
    _rms_norm_kernel on the slot form, the same arithmetic (s, y and with QUANT y's FP8 form, rows N apart)."""
    pdl_enter(PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    row = pair // A_DIV
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    sb = tl.load(bs_ptr + expert * bs_se + rn, mask=n_ok, other=0.0)
    if MUL_WEIGHT:
        wt = tl.load(w_ptr + pair)
    w_p = b_ptr + expert * b_se + rn.to(tl.int64)[:, None] * b_sn + _w_cols(rk, A_MODE)[None, :]
    a_p = a_ptr + row * a_sm + (tl.zeros([A_ROWS, 1], dtype=tl.int32) + rk[None, :])
    tl.static_assert(A_MODE != 3, "A_NORM is fp8_gemv's")
    if A_MODE == 0:
        sa = tl.load(as_ptr + row)
    else:
        sa = _a_scale(a_p, K, a_p, 1.0, A_MODE, BLOCK_K, K_CHUNKS)
    y = _rows_dot(w_p, a_p, n_ok, K, sa, a_p, 1.0, A_MODE, BLOCK_N, BLOCK_K, K_CHUNKS, PRE_ROUND) * sa * sb
    if MUL_WEIGHT:
        y = y * wt
    tl.store(c_ptr + pair * c_sm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)
    if NEXT_NORM:
        tok = pair // SLOTS
        if splitk_arrive(cnt_ptr + tok) == SLOTS * tl.num_programs(1) - 1:  # the token's last program
            rh = tl.arange(0, BLOCK_H)
            ok = rh < N
            row_p = c_ptr + tok * SLOTS * c_sm + rh
            xs = tl.load(row_p, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            for j in tl.static_range(1, SLOTS):  # slot order, fp32, one rounding: the norm kernel's slot sum
                xs += tl.load(row_p + j * c_sm, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            dt = c_ptr.dtype.element_ty
            r = tl.load(res_ptr + tok * N + rh, mask=ok, other=0.0)
            x = (xs.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(s_ptr + tok * N + rh, x, mask=ok)
            norm_row(x, tok, rh, ok, nw_ptr, y_ptr, q_ptr, qs_ptr, N, N, N, eps, QUANT, NORM_PRE_ROUND)
            tl.atomic_xchg(cnt_ptr + tok, 0)  # for the next launch (a kernel boundary orders it before)


# The GEMVs take 16-bit activations and quantize them in each program (A_QUANT, A_SILU) instead of after a separate
# launch: fp8_gemm.fp8_linear's M <= GEMV_MAX_M rows with no FP8 form from a fused norm (o_proj's input), and
# fused_moe's GEMV path (the down GEMV forms its SiLU-mul; the gate_up GEMV quantizes x when no norm did). One launch
# a layer fewer each (the quant launch: 3.8 us, the SiLU launch: 4.2 us at B 1 under Nsight Compute, H100 run 40).
# The e4m3 operand and scale are the separate launches'; on the GPU the sums are not bit-equal (16-bit A loads 8-byte
# weight pieces, so a thread's products add in another order than the A_FP8 kernel's 16-byte ones): the same values
# to fp32 sum order (GPU tests; bit-equal under the interpreter). H100 run 42, both GEMVs on: B 1 3.507 / 3.621 ms
# on / off, B 4 6.099 / 6.337. Used only where a GEMV runs; False: the separate launches (bench/ab_step.py --switch
# gemv_act).
FUSED_ACT = True

# (BLOCK_N, BLOCK_K, num_warps) chosen by gemv_config. BLOCK_K = K up to 2048 (one load a chunk, 16-byte pieces).
# Latency is hidden by programs more than by depth within one: ptxas issues a thread's weight loads a few at a time,
# each group just before its FMAs (offline sm_90 SASS; with A loaded once as a row, two 16-byte loads in flight a
# thread, 48-64 registers; 33 at BLOCK_N 1). BLOCK_N is the smallest power of two (<= MAX_BLOCK_N) that keeps the
# launch within CTAS_PER_SM programs an SM: many small programs resident at once (no shared memory to speak of),
# each with its pieces in flight. Registers bound residency too: 65,536 an SM hold 12 programs of 128 threads at
# <= 42 registers, 8 at 64, 7 at 72 (the quantizing modes).
MAX_BLOCK_N = 8
MAX_BLOCK_K = 2048
CTAS_PER_SM = 12
WARPS = 4
_CPU_CONFIG = (16, 128, 1)  # the interpreter: few programs and chunks (its cost is per program and op)


def gemv_config(device: torch.device, m: int, n: int, k: int) -> tuple[int, int, int]:
    if device.type != "cuda":
        return _CPU_CONFIG
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(triton.cdiv(m * n, CTAS_PER_SM * sm_count(device))))
    return block_n, min(MAX_BLOCK_K, triton.next_power_of_2(k)), WARPS


def a_rows(block_n: int, block_k: int, warps: int, a_mode: int = A_FP8) -> int:
    """The kernels' A_ROWS: 1 where A's chunk loads as one [1, BLOCK_K] row in the weight tile's own register layout,
    i.e. where one row of the tile's layout (16-byte loads of A: 16 e4m3 or 8 16-bit values a thread, 32 threads a
    warp, the warps side by side) tiles BLOCK_K evenly, so the row broadcasts over the tile's BLOCK_N rows in
    registers (offline sm_90: one load a thread a piece instead of BLOCK_N, and for A_SILU one exp a column instead
    of BLOCK_N); else BLOCK_N: every tile row loads it (no layout conversion either)."""
    return 1 if block_k % ((16 if a_mode == A_FP8 else 8) * 32 * warps) == 0 else block_n


def _check_a(a: torch.Tensor, a_scale: torch.Tensor | None, k: int, a_mode: int) -> None:
    check(a.stride(1) == 1, "A rows must be contiguous")
    if a_mode == A_FP8:
        check(a.dtype == FP8_DTYPE and a.shape[1] == k and a_scale is not None, "A_FP8: e4m3 [R, K] and scales")
    else:
        check(a.dtype in (torch.bfloat16, torch.float16), "A_QUANT / A_SILU / A_NORM: 16-bit rows")
        check(a.shape[1] == (2 * k if a_mode == A_SILU else k), "A_QUANT / A_NORM: [R, K]; A_SILU: [R, 2K]")


def fp8_gemv(a, a_scale, w_q, w_scale, bias, out: torch.Tensor, config: tuple[int, int, int] | None = None,
             a_mode: int = A_FP8, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Launch on checked per-channel weights (fp8_gemm._check_args with block 0); out [M, N] (row stride free,
    columns contiguous). a: [M, K] e4m3 with a_scale [M, 1] (A_FP8), or 16-bit rows the kernel quantizes itself
    (A_QUANT [M, K], A_SILU [M, 2K], A_NORM [M, K] with norm = (weight [K] of a's dtype, eps); a_scale None).
    config: (BLOCK_N, BLOCK_K, warps) instead of gemv_config's (bench/decode_sweep.py)."""
    m = a.shape[0]
    n, k = w_q.shape
    _check_a(a, a_scale, k, a_mode)
    block_n, block_k, warps = config or gemv_config(a.device, m, n, k)
    nw, eps = norm if norm is not None else (w_scale, 0.0)
    if a_mode == A_NORM:
        check(norm is not None and nw.shape == (k,) and nw.dtype == a.dtype and nw.is_contiguous(),
              "A_NORM: norm = (weight [K] of A's dtype, contiguous; eps)")
        check(k <= block_k, "A_NORM: K within one chunk")
    scale_arg = a_scale if a_scale is not None else w_scale
    _fp8_gemv_kernel[(m, triton.cdiv(n, block_n))](
        a, w_q, out, scale_arg, w_scale, bias if bias is not None else w_scale, nw, n, k,
        a.stride(0), w_q.stride(0), out.stride(0), scale_arg.stride(0), w_scale.stride(0), float(eps),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, K_CHUNKS=triton.cdiv(k, block_k),
        A_MODE=a_mode, A_ROWS=a_rows(block_n, block_k, warps, a_mode),
        PRE_ROUND=INTERPRET and a_mode != A_FP8, num_warps=warps, num_stages=1, **pdl_kw(a.device, m),
    )
    return out


def moe_gemv(a, a_scale, b, b_scale, c, weights, ids, a_div: int, mul_weight: bool,
             config: tuple[int, int, int] | None = None, a_mode: int = A_FP8, next_norm=None):
    """fused_moe's grouped GEMM for few pairs, one program a (pair, N block): a [R, K] e4m3 (row pair // a_div)
    with a_scale [R] (or [R, 1]) fp32 contiguous, or 16-bit rows the kernel quantizes itself (A_QUANT [R, K], A_SILU
    [R, 2K]; a_scale None); b [E, N, K] e4m3, b_scale [E, N] fp32, weights [P] fp32, ids [P] (the expert of each
    pair, flat [T, k] order), c [P, N] -> c. No alignment of pairs by expert: each pair reads its expert's weights,
    so two pairs of one expert read them twice (from L2 when adjacent); for T <= 4 tokens.
    next_norm: (counters [T] int32 (0, _common.arrival_counters), residual [T, N], norm weight [N], eps, quant) for
    the down GEMV of the slot form (c [T * k, N], ids [T, k]): the kernel's NEXT_NORM epilogue, -> (c, (y, s,
    (q, scale) or None)) = (c, rmsnorm.add_rms_norm(_fp8)(c.view(T, k, N), residual, weight, eps))."""
    num_pairs = ids.numel()
    n, k = b.shape[1], b.shape[2]
    _check_a(a, a_scale, k, a_mode)
    block_n, block_k, warps = config or gemv_config(b.device, num_pairs, n, k)
    norm_args, normed = {}, None
    if next_norm is not None:
        counters, residual, norm_weight, eps, quant = next_norm
        t, slots = ids.shape
        check(ids.dim() == 2 and residual.shape == (t, n) and residual.is_contiguous() and c.stride(1) == 1
              and norm_weight.shape == (n,) and norm_weight.is_contiguous() and counters.numel() >= t,
              "next_norm: ids [T, k], residual [T, N] contiguous, norm weight [N], T counters")
        y, s = new_out((t, n), c.dtype, c.device), new_out((t, n), c.dtype, c.device)
        q = new_out((t, n), FP8_DTYPE, c.device) if quant else y
        qs = new_out((t, 1), torch.float32, c.device) if quant else y
        norm_args = dict(cnt_ptr=counters, res_ptr=residual, nw_ptr=norm_weight, y_ptr=y, s_ptr=s, q_ptr=q, qs_ptr=qs,
                         eps=float(eps), NEXT_NORM=True, SLOTS=slots, BLOCK_H=next_pow2(n), QUANT=bool(quant),
                         NORM_PRE_ROUND=INTERPRET)
        normed = (y, s, (q, qs) if quant else None)
    _moe_gemv_kernel[(num_pairs, triton.cdiv(n, block_n))](
        a, b, c, a_scale if a_scale is not None else b_scale, b_scale, weights, ids, n, k, a.stride(0), b.stride(0),
        b.stride(1), c.stride(0), b_scale.stride(0), A_DIV=a_div, MUL_WEIGHT=mul_weight, BLOCK_N=block_n,
        BLOCK_K=block_k, K_CHUNKS=triton.cdiv(k, block_k), A_MODE=a_mode,
        A_ROWS=a_rows(block_n, block_k, warps, a_mode),
        PRE_ROUND=INTERPRET and a_mode != A_FP8, num_warps=warps, num_stages=1, **norm_args,
        **pdl_kw(b.device, num_pairs),
    )
    return c if next_norm is None else (c, normed)
