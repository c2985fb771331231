"""MLA's per-token cache write and query RoPE in ONE launch (Triton on CUDA; every worker rank).

Replaces four launches per MLA layer (kv_a_layernorm, RoPE of k_pe, the cache index_copy_, RoPE of q_pe)
with one; same values as shared.model.ops.mla_kv_write_ref except RoPE's rounding (fp32 math, one rounding
at the store, as kernels/rope.py; the reference rounds after every torch op in the model dtype).
One program per token t:
  cache[slot_mapping[t], 0, :L]  = rms_norm(ckv[t, :L]) * w     (HF: normalise in fp32, cast, times w)
  cache[slot_mapping[t], 0, L:]  = rope(ckv[t, L:])              (one "kv head" of R dims)
  q_out[t, h, :]                 = rope(q_pe[t, h, :])            for every local head h
RoPE rotates the first rotary_dim of the R dims; the rest are copied.
Shapes: ckv [T, L + R] (rows of the fused q_a/kv_a GEMM output, any row stride), cos/sin [T, rotary_dim / 2] fp32,
cache [num_slots, 1, L + R], slot_mapping [T] int64, q_pe / q_out [T, h, R] (any token / head strides).
Bytes: T * (2 (L + R) + 2 h R) elements; at decode the launch, not the bytes, is the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, next_pow2, rope_pair, pdl_enter, pdl_kw


@triton.jit
def _rope_pair(base, i, mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The two halves a rotation pairs, fp32: interleaved (2i, 2i+1), NeoX (i, i + HALF)."""
    i1, i2 = rope_pair(i, HALF, INTERLEAVED)
    return tl.load(base + i1, mask=mask, other=0.0).to(tl.float32), tl.load(base + i2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mla_kv_write_kernel(
    ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, q_ptr, qo_ptr,
    ckv_st, cs_st, cache_ss, q_st, q_sh, qo_st, qo_sh, num_heads, eps,
    L: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    row = ckv_ptr + t * ckv_st
    dst = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * cache_ss
    # latent: RMSNorm with HF's rounding (normalised value cast to the input dtype before the weight)
    cols = tl.arange(0, BLOCK_L)
    lm = cols < L
    x = tl.load(row + cols, mask=lm, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / L + eps)
    w = tl.load(w_ptr + cols, mask=lm, other=0.0).to(tl.float32)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype)
    tl.store(dst + cols, y.to(cache_ptr.dtype.element_ty), mask=lm)
    # k_pe: rotated, written de-interleaved [rot_even | rot_odd] (as HF and kernels/rope.py)
    i = tl.arange(0, BLOCK_HALF)
    im = i < HALF
    c = tl.load(cos_ptr + t * cs_st + i, mask=im, other=0.0)
    s = tl.load(sin_ptr + t * cs_st + i, mask=im, other=0.0)
    k1, k2 = _rope_pair(row + L, i, im, HALF, INTERLEAVED)
    tl.store(dst + L + i, (k1 * c - k2 * s).to(x.dtype).to(cache_ptr.dtype.element_ty), mask=im)
    tl.store(dst + L + HALF + i, (k2 * c + k1 * s).to(x.dtype).to(cache_ptr.dtype.element_ty), mask=im)
    # q_pe of every head: [BLOCK_H, BLOCK_HALF]
    h = tl.arange(0, BLOCK_H)
    qm = (h[:, None] < num_heads) & im[None, :]
    q1, q2 = _rope_pair(q_ptr + t * q_st + h[:, None] * q_sh, i[None, :], qm, HALF, INTERLEAVED)
    out = qo_ptr + t * qo_st + h[:, None] * qo_sh + i[None, :]
    tl.store(out, (q1 * c[None, :] - q2 * s[None, :]).to(qo_ptr.dtype.element_ty), mask=qm)
    tl.store(out + HALF, (q2 * c[None, :] + q1 * s[None, :]).to(qo_ptr.dtype.element_ty), mask=qm)
    if REST > 0:  # the R - rotary_dim pass-through dims, after the rotated ones
        r = tl.arange(0, BLOCK_REST)
        rm = r < REST
        tl.store(dst + L + 2 * HALF + r, tl.load(row + L + 2 * HALF + r, mask=rm).to(cache_ptr.dtype.element_ty),
                 mask=rm)
        qrm = (h[:, None] < num_heads) & rm[None, :]
        tail = tl.load(q_ptr + t * q_st + h[:, None] * q_sh + 2 * HALF + r[None, :], mask=qrm)
        tl.store(qo_ptr + t * qo_st + h[:, None] * qo_sh + 2 * HALF + r[None, :], tail, mask=qrm)


def mla_kv_write(ckv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 cache: torch.Tensor, slot_mapping: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor,
                 rotary_dim: int, interleaved: bool) -> None:
    """shared.model.ops.mla_kv_write_ref's signature and effect (see the module docstring)."""
    t, lora = ckv.shape[0], norm_weight.shape[0]
    r = ckv.shape[1] - lora
    check(ckv.dim() == 2 and ckv.stride(1) == 1 and 0 < rotary_dim <= r and rotary_dim % 2 == 0,
          "ckv must be [T, L + R] rows, 0 < rotary_dim <= R even")
    check(torch.promote_types(ckv.dtype, norm_weight.dtype) == ckv.dtype, "norm weight wider than ckv")
    check(cache.dim() == 3 and cache.shape[1:] == (1, lora + r) and cache.stride(2) == 1, "cache [slots, 1, L + R]")
    check(slot_mapping.shape == (t,) and q_pe.shape == q_out.shape and q_pe.shape[::2] == (t, r), "token counts")
    check(q_pe.stride(2) == 1 and q_out.stride(2) == 1 and q_out.dtype == q_pe.dtype, "q_pe / q_out last dim")
    half = rotary_dim // 2
    check(cos.shape == (t, half) and sin.shape == cos.shape and cos.stride() == sin.stride() and cos.stride(1) == 1,
          "cos/sin [T, rotary_dim / 2]")
    if t == 0:
        return
    _mla_kv_write_kernel[(t,)](
        ckv, norm_weight, cos, sin, cache, slot_mapping, q_pe, q_out,
        ckv.stride(0), cos.stride(0), cache.stride(0), q_pe.stride(0), q_pe.stride(1), q_out.stride(0),
        q_out.stride(1), q_pe.shape[1], float(eps),
        L=lora, BLOCK_L=next_pow2(lora), HALF=half, BLOCK_HALF=max(2, next_pow2(half)),
        BLOCK_H=next_pow2(q_pe.shape[1]), INTERLEAVED=bool(interleaved), REST=r - rotary_dim,
        BLOCK_REST=max(2, next_pow2(r - rotary_dim)), num_warps=4, **pdl_kw(ckv.device, t),
    )
