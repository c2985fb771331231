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
values to fp32 rounding, not the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import pdl_enter, pdl_kw, sm_count


@triton.jit
def _rows_dot(w_p, a_p, n_ok, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr):
    """[BLOCK_N] fp32: sum over k < K of w[n, k] * a[k]. w_p [BLOCK_N, BLOCK_K]: the weight rows' chunk-0 pointers
    (K contiguous); a_p [BLOCK_N, BLOCK_K]: the A row's chunk 0 in every row, loaded in the weight tile's own layout
    (each thread its own 16-byte pieces, L1 hits after the first warp) rather than as a [BLOCK_K] vector, which would
    reach that layout through shared memory and barriers. A chunk is one [BLOCK_N, BLOCK_K] load reduced to
    [BLOCK_N] (in the thread, its warp, then across warps); the first chunk's sum starts the accumulator in that
    reduced layout (a tl.zeros accumulator would need a layout conversion through shared memory every chunk)."""
    rk = tl.arange(0, BLOCK_K)
    for c in tl.static_range(K_CHUNKS):
        k_ok = rk < K - c * BLOCK_K
        w = tl.load(w_p + c * BLOCK_K, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_p + c * BLOCK_K, mask=k_ok[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1)
        if c == 0:
            acc = part
        else:
            acc += part
    return acc


@triton.jit
def _fp8_gemv_kernel(
    a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, N, K, a_sm, w_sn, c_sm, as_sm, ws_sn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Program (row m, N block): c[m, n] = (A[m] . W[n]) * s_a[m] * s_w[n] (+ bias[n]) for BLOCK_N columns."""
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    sw = tl.load(ws_ptr + rn * ws_sn, mask=n_ok, other=0.0)
    sa = tl.load(as_ptr + m * as_sm)
    w_p = w_ptr + rn.to(tl.int64)[:, None] * w_sn + rk[None, :]
    a_p = a_ptr + m * a_sm + (tl.zeros([BLOCK_N, 1], dtype=tl.int32) + rk[None, :])
    y = _rows_dot(w_p, a_p, n_ok, K, BLOCK_N, BLOCK_K, K_CHUNKS) * sa * sw  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + m * c_sm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _moe_gemv_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, w_ptr, ids_ptr, N, K, a_sm, b_se, b_sn, c_sm, bs_se,
    A_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_CHUNKS: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Program (pair, N block): c[pair, n] = (A[pair // A_DIV] . B[e, n]) * s_a[pair // A_DIV] * s_b[e, n]
    (* w[pair]), e = ids[pair]: fused_moe._moe_gemm_kernel's product for one (token, expert) pair, FP8 only."""
    pdl_enter(PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    row = pair // A_DIV
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_p = b_ptr + expert * b_se + rn.to(tl.int64)[:, None] * b_sn + rk[None, :]
    a_p = a_ptr + row * a_sm + (tl.zeros([BLOCK_N, 1], dtype=tl.int32) + rk[None, :])
    y = _rows_dot(w_p, a_p, n_ok, K, BLOCK_N, BLOCK_K, K_CHUNKS)
    y = y * tl.load(as_ptr + row) * tl.load(bs_ptr + expert * bs_se + rn, mask=n_ok, other=0.0)
    if MUL_WEIGHT:
        y = y * tl.load(w_ptr + pair)
    tl.store(c_ptr + pair * c_sm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps) chosen by gemv_config. BLOCK_K = K up to 2048 (one load a chunk, 16-byte pieces).
# Latency is hidden by programs, not by depth within one: ptxas issues a thread's 16-byte weight loads one after
# another, each after the previous piece's FMAs (offline sm_90 SASS: 34 registers, the loads sunk to their uses),
# so a program has about one load a thread in flight. BLOCK_N is the smallest power of two (<= MAX_BLOCK_N) that
# keeps the launch within CTAS_PER_SM programs an SM: many small programs resident at once (34-64 registers, no
# shared memory to speak of), each with its piece in flight.
MAX_BLOCK_N = 8
MAX_BLOCK_K = 2048
CTAS_PER_SM = 12
WARPS = 4
_CPU_CONFIG = (4, 32, 1)


def gemv_config(device: torch.device, m: int, n: int, k: int) -> tuple[int, int, int]:
    if device.type != "cuda":
        return _CPU_CONFIG
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(triton.cdiv(m * n, CTAS_PER_SM * sm_count(device))))
    return block_n, min(MAX_BLOCK_K, triton.next_power_of_2(k)), WARPS


def fp8_gemv(a_q, a_scale, w_q, w_scale, bias, out: torch.Tensor,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Launch on checked per-channel arguments (fp8_gemm._check_args with block 0); out [M, N] (row stride free,
    columns contiguous). config: (BLOCK_N, BLOCK_K, warps) instead of gemv_config's (bench/decode_sweep.py)."""
    m, k = a_q.shape
    n = w_q.shape[0]
    block_n, block_k, warps = config or gemv_config(a_q.device, m, n, k)
    _fp8_gemv_kernel[(m, triton.cdiv(n, block_n))](
        a_q, w_q, out, a_scale, w_scale, bias if bias is not None else w_scale, n, k,
        a_q.stride(0), w_q.stride(0), out.stride(0), a_scale.stride(0), w_scale.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, K_CHUNKS=triton.cdiv(k, block_k),
        num_warps=warps, num_stages=1, **pdl_kw(a_q.device, m),
    )
    return out


def moe_gemv(a, a_scale, b, b_scale, c, weights, ids, a_div: int, mul_weight: bool,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """fused_moe's grouped GEMM for few pairs, one program a (pair, N block): a [R, K] e4m3 (row pair // a_div),
    a_scale [R] (or [R, 1]) fp32 contiguous, b [E, N, K] e4m3, b_scale [E, N] fp32, weights [P] fp32, ids [P] (the
    expert of each pair, flat [T, k] order), c [P, N] -> c. No alignment of pairs by expert: each pair reads its
    expert's weights, so two pairs of one expert read them twice (from L2 when adjacent); for T <= 4 tokens."""
    num_pairs = ids.numel()
    n, k = b.shape[1], b.shape[2]
    block_n, block_k, warps = config or gemv_config(b.device, num_pairs, n, k)
    _moe_gemv_kernel[(num_pairs, triton.cdiv(n, block_n))](
        a, b, c, a_scale, b_scale, weights, ids, n, k, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        b_scale.stride(0), A_DIV=a_div, MUL_WEIGHT=mul_weight, BLOCK_N=block_n, BLOCK_K=block_k,
        K_CHUNKS=triton.cdiv(k, block_k), num_warps=warps, num_stages=1, **pdl_kw(b.device, num_pairs),
    )
    return c
