"""Per-channel W8A8 FP8 GEMM for prefill sizes (M > 512) with Hopper TMA tensor descriptors; every
worker rank of an FP8 checkpoint. kernels.fp8_gemm.fp8_gemm routes large per-channel GEMMs here.

  y [M, N] = (A_q [M, K] . W_q [N, K]^T) * s_a [M, 1] * s_w [N, 1] (+ bias [N]), bf16 out
Same math as fp8_gemm._fp8_gemm_kernel, but A and W tiles come in through the copy engine (one
thread issues each tile copy, out-of-range rows / K tails are zero-filled by the hardware), so the
loop carries no per-thread pointer tensors or masks: registers go to the accumulators.
Needs K * 1 byte and the row strides to be multiples of 16 (TMA); the caller falls back otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _fp8_gemm_tma_kernel(
    a_desc, w_desc, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K, c_sm, as_sm, ws_sn,
    HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISE_ACC: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile; tiles walked in GROUP_M-row bands (W tiles reused in L2)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_band
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_band
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])  # [BLOCK_M, BLOCK_K]
        w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])  # [BLOCK_N, BLOCK_K], K-major as wgmma wants
        if PRECISE_ACC:  # add each BLOCK_K-deep partial into fp32 (as _scaled_mm without fast accum)
            acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, w.T, acc)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sa = tl.load(as_ptr + rm * as_sm, mask=rm < M, other=0.0)
    sw = tl.load(ws_ptr + rn * ws_sn, mask=rn < N, other=0.0)
    acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_p = c_ptr + rm.to(tl.int64)[:, None] * c_sm + rn[None, :]
    tl.store(c_p, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def tma_ok(a_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA wants 16-byte aligned bases and row strides (fp8: multiples of 16 elements)."""
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, w_q))


def fp8_gemm_tma(a_q, a_scale, w_q, w_scale, bias, out: torch.Tensor, cfg: tuple[int, ...],
                 precise: bool) -> torch.Tensor:
    """Launch on checked arguments (fp8_gemm._check_args); cfg = (BM, BN, BK, GROUP_M, warps, stages)."""
    bm, bn, bk, group_m, warps, stages = cfg
    m, k = a_q.shape
    n = w_q.shape[0]
    a_desc = TensorDescriptor.from_tensor(a_q, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_q, [bn, bk])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_tma_kernel[grid](
        a_desc, w_desc, out, a_scale, w_scale, bias if bias is not None else w_scale, m, n, k,
        out.stride(0), a_scale.stride(0), w_scale.stride(0), HAS_BIAS=bias is not None, GROUP_M=group_m,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISE_ACC=precise, num_warps=warps, num_stages=stages,
    )
    return out
