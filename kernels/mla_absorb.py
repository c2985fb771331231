"""MLA's absorbed up-projections as one per-head GEMM launch each, reading kv_b_proj's own weights (every
worker rank, glm4_moe_lite decode / verify / short prefills).

  out[t, h, :] = a[t, h, :] @ Wd[h]        k_rows=True:  W_UK, Wd[h] = W[h] [K = nope rows, N = L]
  out[t, h, :] = a[t, h, :] @ Wd[h]^T      k_rows=False: W_UV, Wd[h] = W[h] [N = v rows, K = L]
W [h, R, C] is a view of kv_b_proj's weight ([h * (nope + v), L] rows, this rank's heads), never a copy.
FP8 kv_b_proj (per-row scale s [h, R]): each weight tile is dequantized in registers exactly as the reference
does it once per call, Wd = (float(W) * s).to(a.dtype), then a 16-bit tensor-core dot with fp32
accumulation: the reference's values, at half the bytes of a dequantized bf16 copy (before: torch.bmm on such
a copy, 2 x 4.2 us a layer at batch 1 on an H100, ~0.36 of HBM, and cuBLAS breaks the PDL chain).
Bytes: h * R * C weight elements (1 or 2 bytes) + T * h * (K + N) activations; at decode the weights dominate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import FP8_DTYPE, INTERPRET, check, dot_in, dot_precision, next_pow2, pdl_enter, pdl_kw
from glmserve.kernels.mla_kv_write import kv_meta, kv_row, rope_heads, rope_meta


@triton.jit
def _mla_absorb_kernel(
    a_ptr, w_ptr, s_ptr, o_ptr, T, K, N,
    a_st, a_sh, w_sh, w_sr, s_sh, o_st, o_sh,
    K_ROWS: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
    qpe_ptr=None, cos_ptr=None, sin_ptr=None, qo_ptr=None, qpe_st=0, qpe_sh=0, qo_st=0, qo_sh=0, cs_st=0,
    ROPE: tl.constexpr = False, HALF: tl.constexpr = 1, BLOCK_HALF: tl.constexpr = 2,
    INTERLEAVED: tl.constexpr = False, REST: tl.constexpr = 0, BLOCK_REST: tl.constexpr = 2,
    ckv_ptr=None, kvw_ptr=None, cache_ptr=None, slot_ptr=None, ckv_st=0, cache_ss=0, kv_eps=0.0,
    KV_WRITE: tl.constexpr = False, L: tl.constexpr = 1, BLOCK_L: tl.constexpr = 2, BLOCK_H: tl.constexpr = 1,
):
    """Program (N block, head, M block): out[rm, head, rn] over all K. a's, W's and out's last dims are
    contiguous; W tile [BLOCK_K, BLOCK_N] = W[head, rk, rn] (K_ROWS) or W[head, rn, rk]^T. ROPE: the N block 0
    programs also write q_out[rm, head] = rope(q_pe[rm, head]) (mla_kv_write's query RoPE, same bits). KV_WRITE:
    programs of the one N block past the last (grid dim 0) do mla_kv_write's work instead, each for the tokens
    mb * BLOCK_M + head + j * H of its M block: the token's cache entry and its query RoPE for every head, with
    mla_kv_write's own helpers (same bits), beside the GEMM programs rather than in them."""
    pdl_enter(PDL)
    if KV_WRITE:
        if tl.program_id(0) == tl.num_programs(0) - 1:
            heads_n = tl.num_programs(1)
            first = tl.program_id(2) * BLOCK_M + tl.program_id(1)
            last = tl.minimum(T, (tl.program_id(2) + 1) * BLOCK_M)
            h = tl.arange(0, BLOCK_H)[None, :]
            for j in range(0, tl.cdiv(last - first, heads_n)):  # none when first >= last
                t = (first + j * heads_n).to(tl.int64)
                kv_row(t, ckv_ptr, kvw_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, ckv_st, cs_st, cache_ss,
                       kv_eps, L, BLOCK_L, HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST)
                rows = t + tl.zeros([1, BLOCK_H], dtype=tl.int64)
                rope_heads(rows, rows >= 0, h, h < heads_n, qpe_ptr, qo_ptr, cos_ptr, sin_ptr, qpe_st, qpe_sh, qo_st,
                           qo_sh, cs_st, HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST)
            return
    head = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < T
    n_ok = rn < N
    if ROPE:
        if tl.program_id(0) == 0:
            heads = head + tl.zeros([1, 1], dtype=tl.int64)
            rope_heads(rm.to(tl.int64)[:, None], m_ok[:, None], heads, heads >= 0, qpe_ptr, qo_ptr, cos_ptr,
                       sin_ptr, qpe_st, qpe_sh, qo_st, qo_sh, cs_st, HALF, BLOCK_HALF, INTERLEAVED, REST,
                       BLOCK_REST)
    a_p = a_ptr + head * a_sh + rm.to(tl.int64)[:, None] * a_st + rk[None, :]
    if K_ROWS:
        w_p = w_ptr + head * w_sh + rk[:, None] * w_sr + rn[None, :]
        s_p = s_ptr + head * s_sh + rk  # scale of each K row
    else:
        w_p = w_ptr + head * w_sh + rn[None, :] * w_sr + rk[:, None]
        if FP8:
            s_n = tl.load(s_ptr + head * s_sh + rn, mask=n_ok, other=0.0)  # scale of each N row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kb * BLOCK_K
        a = tl.load(a_p, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_p, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            if K_ROWS:
                s = tl.load(s_p, mask=k_ok, other=0.0)[:, None]
                s_p += BLOCK_K
            else:
                s = s_n[None, :]
            w = (w.to(tl.float32) * s).to(a.dtype)  # the reference's dequantized weight, element for element
        acc = tl.dot(dot_in(a, UPCAST), dot_in(w, UPCAST), acc, input_precision=PREC)
        a_p += BLOCK_K
        if K_ROWS:
            w_p += BLOCK_K * w_sr
        else:
            w_p += BLOCK_K
    o_p = o_ptr + head * o_sh + rm.to(tl.int64)[:, None] * o_st + rn[None, :]
    tl.store(o_p, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by k_rows; BLOCK_M shrinks to the token count (>= 16, tl.dot's floor).
# N blocks x heads fill an H100 (W_UK 512 / 64 x 20 heads, W_UV 256 / 32 x 20) at batch 1. H100 run 29 (eager
# profile, both GEMMs a layer): B 1 3.96 us a launch (bmm on a bf16 copy 4.2), B 256 10.1 (bmm 6.5).
# H100 run 30 (bench/decode_sweep.py --only absorb, L2-cold graphs, us at B 1 / 64 / 256; 12 configs and bmm):
# W_UK 64x64x64 3.5 / 4.6 / 7.3 is the best config at every B (bmm 3.8 / 4.5 / 6.5); W_UV 64x32x128 3.6 / 5.7 /
# 12.1 best up to B 64 (bmm 4.6 / 4.8 / 5.8), but at B 256 its 8 N blocks each re-read a 5 MB input: 64x64x64
# 8.5 there (LARGE_CONFIGS, T > 64). Wider N blocks, BLOCK_M 128 / 256 and 8 warps lost at every B.
CONFIGS: dict[bool, tuple[int, int, int, int, int]] = {True: (64, 64, 64, 4, 3), False: (64, 32, 128, 4, 3)}
LARGE_CONFIGS: dict[bool, tuple[int, int, int, int, int]] = {True: (64, 64, 64, 4, 3), False: (64, 64, 64, 4, 3)}
LARGE_T = 64
_CPU_CONFIG = (16, 32, 32, 4, 1)


def mla_absorb(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, k_rows: bool,
               out: torch.Tensor, rope=None, kv_write=None,
               config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """shared.model.ops.mla_absorb_ref's signature: a [T, h, K], w [h, R, C] (fp8 with w_scale [h, R] fp32, or
    a.dtype), out [T, h, N] (any token / head strides) -> out; rope (q_pe [T, h, R], cos, sin [T, rotary_dim / 2],
    q_out [T, h, R], rotary_dim, interleaved): q_out = rope(q_pe) in the same launch; kv_write (mla_kv_write's
    arguments): its cache write and query RoPE in the same launch, by programs of their own. config: (BLOCK_M,
    BLOCK_N, BLOCK_K, warps, stages) instead of the table's (bench/decode_sweep.py --only absorb)."""
    t, heads, k = a.shape
    r, c = w.shape[1:]
    n = c if k_rows else r
    fp8 = w.dtype == FP8_DTYPE
    check(w.shape[0] == heads and k == (r if k_rows else c) and out.shape == (t, heads, n), "absorb shapes")
    check(a.stride(2) == 1 and w.stride(2) == 1 and out.stride(2) == 1, "last dims must be contiguous")
    check(fp8 == (w_scale is not None) and (fp8 or w.dtype == a.dtype), "fp8 weights need scales; else a's dtype")
    check(not fp8 or (w_scale.shape == (heads, r) and w_scale.dtype == torch.float32 and w_scale.stride(1) == 1),
          "scale [h, R] fp32, rows contiguous")
    if t == 0:
        return out
    table = LARGE_CONFIGS if t > LARGE_T else CONFIGS
    bm, bn, bk, warps, stages = config or (table[k_rows] if a.is_cuda else _CPU_CONFIG)
    bm = min(bm, max(16, triton.next_power_of_2(t)))
    scale = w_scale if fp8 else w
    check(rope is None or kv_write is None, "rope and kv_write both write the query RoPE")
    extra = _kv_write_args(kv_write, t, heads) if kv_write is not None else (
        _rope_args(rope, t, heads) if rope is not None else {})
    grid = (triton.cdiv(n, bn) + (kv_write is not None), heads, triton.cdiv(t, bm))
    _mla_absorb_kernel[grid](
        a, w, scale, out, t, k, n, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        scale.stride(0) if fp8 else 0, out.stride(0), out.stride(1),
        K_ROWS=k_rows, FP8=fp8, UPCAST=INTERPRET, PREC=dot_precision(a.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **pdl_kw(a.device, t), **extra,
    )
    return out


def _kv_write_args(kv_write, t: int, heads: int) -> dict:
    """The absorb kernel's KV_WRITE arguments from mla_kv_write's (checked as mla_kv_write checks them)."""
    ckv, norm_weight, eps, cos, sin, cache, slot_mapping, q_pe, q_out, rotary_dim, interleaved = kv_write
    meta = kv_meta(ckv, norm_weight, cos, sin, cache, slot_mapping, rotary_dim, interleaved)
    args = _rope_args((q_pe, cos, sin, q_out, rotary_dim, interleaved), t, heads)
    args.update(meta, ROPE=False, KV_WRITE=True, BLOCK_H=max(2, next_pow2(heads)), ckv_ptr=ckv, kvw_ptr=norm_weight,
                cache_ptr=cache, slot_ptr=slot_mapping, ckv_st=ckv.stride(0), cache_ss=cache.stride(0),
                kv_eps=float(eps))
    return args


def _rope_args(rope, t: int, heads: int) -> dict:
    """The absorb kernel's RoPE arguments (see mla_absorb)."""
    q_pe, cos, sin, q_out, rotary_dim, interleaved = rope
    r = q_pe.shape[2]
    check(q_pe.shape == q_out.shape == (t, heads, r), "q_pe / q_out [T, h, R]")
    check(q_pe.stride(2) == 1 and q_out.stride(2) == 1 and q_out.dtype == q_pe.dtype, "q_pe / q_out last dim")
    return dict(qpe_ptr=q_pe, cos_ptr=cos, sin_ptr=sin, qo_ptr=q_out, qpe_st=q_pe.stride(0), qpe_sh=q_pe.stride(1),
                qo_st=q_out.stride(0), qo_sh=q_out.stride(1), cs_st=cos.stride(0), ROPE=True,
                **rope_meta(cos, sin, t, r, rotary_dim, interleaved))
