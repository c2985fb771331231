"""GQA attention's per-token prologue in ONE launch (Triton on CUDA; every worker rank of glm4_moe):
optional per-head q/k RMSNorm (use_qk_norm), partial RoPE of q and k, and K/V written at the tokens'
cache slots. Replaces up to six launches a layer (q_norm, k_norm, RoPE q, RoPE k, two index_copy_);
same values as shared.model.ops.gqa_kv_write_ref except RoPE's rounding (fp32 math, one rounding at
the store, as kernels/rope.py).
One program per token t, for every head h of its kind:
  q_out[t, h]             = rope(norm_q(q[t, h]))
  k_cache[slot[t], h]     = rope(norm_k(k[t, h]))
  v_cache[slot[t], h]     = v[t, h]
RoPE rotates the first rotary_dim of the D dims (NeoX pairs i, i + rotary_dim / 2; interleaved 2i, 2i + 1,
written de-interleaved as kernels/rope.py); the norm (over all D dims) comes first, with HF's rounding.
Shapes: q [T, Hq, D], k / v [T, Hkv, D] (views of the fused qkv GEMM output: any token / head strides,
D contiguous), cos/sin [T, rotary_dim / 2] fp32, caches [num_slots, Hkv, D], slot_mapping [T] int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, new_out, next_pow2, rope_pair, pdl_enter, pdl_kw


@triton.jit
def _norm_rope_heads(src, dst, w_ptr, c, s, heads, eps, num_heads, D: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
                     HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """[BLOCK_H heads] rows at src (+ head * its stride, given as pointers) -> normed, roped rows at dst.
    src / dst: [BLOCK_H, 1] row pointers; c / s: [BLOCK_HALF] fp32."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    r = tl.arange(0, BLOCK_REST)[None, :]
    h_ok = heads[:, None] < num_heads
    m1 = h_ok & (i < HALF)
    mr = h_ok & (r < REST)
    i1, i2 = rope_pair(i, HALF, INTERLEAVED)
    x1 = tl.load(src + i1, mask=m1, other=0.0)
    x2 = tl.load(src + i2, mask=m1, other=0.0)
    xr = tl.load(src + 2 * HALF + r, mask=mr, other=0.0)
    dt = x1.dtype
    f1, f2, fr = x1.to(tl.float32), x2.to(tl.float32), xr.to(tl.float32)
    if HAS_NORM:  # HF RMSNorm over all D dims: normalised value cast to the input dtype, times w, cast
        ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1) + tl.sum(fr * fr, axis=1)
        rstd = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        f1 = ((f1 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + i1, mask=i < HALF, other=0.0).to(tl.float32))
        f2 = ((f2 * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + i2, mask=i < HALF, other=0.0).to(tl.float32))
        fr = ((fr * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + 2 * HALF + r, mask=r < REST, other=0.0).to(
            tl.float32))
        f1, f2, fr = f1.to(dt).to(tl.float32), f2.to(dt).to(tl.float32), fr.to(dt).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(dst + i, (f1 * c[None, :] - f2 * s[None, :]).to(dt).to(out_ty), mask=m1)
    tl.store(dst + HALF + i, (f2 * c[None, :] + f1 * s[None, :]).to(dt).to(out_ty), mask=m1)
    tl.store(dst + 2 * HALF + r, fr.to(dt).to(out_ty), mask=mr)


@triton.jit
def _gqa_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, qo_st, qo_sh, kc_ss, kc_sh, vc_ss, vc_sh, cs_st, num_q, num_kv, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, HAS_NORM: tl.constexpr,
    INTERLEAVED: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + t * cs_st + i, mask=i < HALF, other=0.0)
    s = tl.load(sin_ptr + t * cs_st + i, mask=i < HALF, other=0.0)
    hq = tl.arange(0, BLOCK_HQ)
    _norm_rope_heads(q_ptr + t * q_st + hq[:, None] * q_sh, qo_ptr + t * qo_st + hq[:, None] * qo_sh, qw_ptr, c, s,
                     hq, eps, num_q, D, HALF, BLOCK_HALF, REST, BLOCK_REST, HAS_NORM, INTERLEAVED)
    hk = tl.arange(0, BLOCK_HKV)
    _norm_rope_heads(k_ptr + t * k_st + hk[:, None] * k_sh, kc_ptr + slot * kc_ss + hk[:, None] * kc_sh, kw_ptr, c,
                     s, hk, eps, num_kv, D, HALF, BLOCK_HALF, REST, BLOCK_REST, HAS_NORM, INTERLEAVED)
    d = tl.arange(0, BLOCK_D)[None, :]
    vm = (hk[:, None] < num_kv) & (d < D)
    v = tl.load(v_ptr + t * v_st + hk[:, None] * v_sh + d, mask=vm)
    tl.store(vc_ptr + slot * vc_ss + hk[:, None] * vc_sh + d, v.to(vc_ptr.dtype.element_ty), mask=vm)


def _warps(num_q: int, d: int) -> int:
    """Enough warps that the q heads' [Hq, D] fp32 tile stays in registers (GLM-4.5: 96 x 128 spilled at 4)."""
    return max(4, min(16, next_pow2(num_q) * next_pow2(d) // 2048))


def gqa_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor | None,
                 k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> torch.Tensor:
    """shared.model.ops.gqa_kv_write_ref's signature and effect (module docstring); returns q_out [T, Hq, D]."""
    t, num_q, d = q.shape
    num_kv = k.shape[1]
    has_norm = q_norm_weight is not None
    check(k.shape == v.shape == (t, num_kv, d) and k_cache.shape[1:] == (num_kv, d) == v_cache.shape[1:],
          "q [T, Hq, D], k / v [T, Hkv, D], caches [slots, Hkv, D]")
    check(q.stride(2) == k.stride(2) == v.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1, "D contiguous")
    check(0 < rotary_dim <= d and rotary_dim % 2 == 0, "0 < rotary_dim <= D, even")
    check(not has_norm or (q_norm_weight.shape == (d,) and k_norm_weight is not None and k_norm_weight.shape == (d,)
                           and q_norm_weight.is_contiguous() and k_norm_weight.is_contiguous()), "norm weights [D]")
    check(not has_norm or torch.promote_types(q.dtype, q_norm_weight.dtype) == q.dtype, "norm weight wider than q")
    half = rotary_dim // 2
    check(cos.shape == (t, half) and sin.shape == cos.shape and cos.stride() == sin.stride() and cos.stride(1) == 1,
          "cos/sin [T, rotary_dim / 2]")
    check(slot_mapping.shape == (t,), "slot_mapping [T]")
    q_out = new_out((t, num_q, d), q.dtype, q.device)
    if t == 0:
        return q_out
    rest = d - rotary_dim
    _gqa_kv_write_kernel[(t,)](
        q, k, v, q_norm_weight if has_norm else q, k_norm_weight if has_norm else q, cos, sin, q_out, k_cache,
        v_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        cos.stride(0), num_q, num_kv, float(eps),
        D=d, BLOCK_D=next_pow2(d), HALF=half, BLOCK_HALF=max(2, next_pow2(half)), REST=rest,
        BLOCK_REST=max(2, next_pow2(rest)), BLOCK_HQ=next_pow2(num_q), BLOCK_HKV=next_pow2(num_kv),
        HAS_NORM=has_norm, INTERLEAVED=bool(interleaved), num_warps=_warps(num_q, d), **pdl_kw(q.device, t),
    )
    return q_out
