"""Per-channel W8A8 FP8 GEMV for decode's smallest batches (M <= fp8_gemm.GEMV_MAX_M), every worker rank of an
FP8 checkpoint; kernels.fp8_gemm.fp8_gemm routes such GEMMs here on CUDA.

  y [M, N] = (A_q [M, K] . W_q [N, K]^T) * s_a [M, 1] * s_w [N, 1] (+ bias [N]), bf16 (or fp32) out
Program (row m, N block): its [BLOCK_N, K] weight slice comes in K_CHUNKS unrolled [BLOCK_N, BLOCK_K] loads with
no barrier between them (so all can be in flight together), each multiplied elementwise into a [BLOCK_N, BLOCK_K]
fp32 accumulator (fp8 x fp8 products are exact in fp32); one reduction over BLOCK_K at the end. Against the
MMA kernel at M 1: no padding of M to a 16-row MMA tile, no software-pipeline prologue, and K is never split
across programs, so no fp32 partials, arrival counters or finisher round trips. Rows of one N block are adjacent
programs (m is grid dim 0), so M > 1 reads each weight slice from DRAM about once and from L2 after.
Sums run in a different order than the MMA kernel's: the same values to fp32 rounding, not the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import pdl_enter, pdl_kw, sm_count


@triton.jit
def _fp8_gemv_kernel(
    a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, N, K, a_sm, w_sn, c_sm, as_sm, ws_sn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_p = w_ptr + rn.to(tl.int64)[:, None] * w_sn + rk[None, :]  # [BLOCK_N, BLOCK_K], K contiguous
    # [BLOCK_N, BLOCK_K], every row the same A chunk: loaded in the weight tile's own layout (each thread its own
    # 16 bytes, L1 hits after the first warp) instead of a [BLOCK_K] vector that would reach that layout through
    # shared memory and two barriers a chunk, which keep the chunks' weight loads from all being in flight
    a_p = a_ptr + m * a_sm + (tl.zeros([BLOCK_N, 1], dtype=tl.int32) + rk[None, :])
    sw = tl.load(ws_ptr + rn * ws_sn, mask=n_ok, other=0.0)
    sa = tl.load(as_ptr + m * as_sm)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for c in tl.static_range(K_CHUNKS):
        k_ok = rk < K - c * BLOCK_K
        w = tl.load(w_p + c * BLOCK_K, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_p + c * BLOCK_K, mask=k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)
    y = tl.sum(acc, axis=1) * sa * sw  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + m * c_sm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps) chosen by gemv_config: BLOCK_K 512 is one warp's 32 x 16-byte loads of a weight row;
# BLOCK_N halves from MAX_BLOCK_N until the launch has ~2 programs an SM (more weight bytes in flight per SM).
# MAX_BLOCK_N 8: the fp32 accumulator is BLOCK_N x BLOCK_K / (32 x WARPS) = 32 registers a thread (offline sm_90:
# 32 x 512 took 254 registers).
MAX_BLOCK_N = 8
WARPS = 4
_CPU_CONFIG = (4, 32, 1)


def gemv_config(device: torch.device, m: int, n: int, k: int) -> tuple[int, int, int]:
    if device.type != "cuda":
        return _CPU_CONFIG
    block_k = min(512, triton.next_power_of_2(k))
    block_n, want = MAX_BLOCK_N, 2 * sm_count(device)
    while block_n > WARPS and m * triton.cdiv(n, block_n) < want:
        block_n //= 2
    return block_n, block_k, WARPS


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
