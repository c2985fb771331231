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

from glmserve.kernels._common import FP8_DTYPE, INTERPRET, check, new_out, next_pow2, pdl_enter, pdl_kw, rope_pair
from glmserve.kernels.rmsnorm import norm_row


@triton.jit
def _rope_pair(base, i, mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The two halves a rotation pairs, fp32: interleaved (2i, 2i+1), NeoX (i, i + HALF)."""
    i1, i2 = rope_pair(i, HALF, INTERLEAVED)
    return tl.load(base + i1, mask=mask, other=0.0).to(tl.float32), tl.load(base + i2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def kv_row(t, ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, ckv_st, cs_st, cache_ss, eps,
           L: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
           INTERLEAVED: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr):
    """Token t's cache entry [rms_norm(ckv[t, :L]) * w | rope(ckv[t, L:])], written at its slot."""
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
    if REST > 0:  # the R - rotary_dim pass-through dims, after the rotated ones
        r = tl.arange(0, BLOCK_REST)
        rm = r < REST
        tl.store(dst + L + 2 * HALF + r, tl.load(row + L + 2 * HALF + r, mask=rm).to(cache_ptr.dtype.element_ty),
                 mask=rm)


@triton.jit
def rope_heads(rows, row_ok, heads, head_ok, q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh, cs_st,
               HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, REST: tl.constexpr,
               BLOCK_REST: tl.constexpr):
    """q_out[t, h, :] = rope(q_pe[t, h, :]) for the tokens `rows` x heads `heads` given as a [BLOCK_T, BLOCK_H]
    grid (one of the two dims of size 1), written de-interleaved, fp32 math and one rounding (the rest copied).
    Shared by mla_kv_write and the W_UK absorb launch (kernels/mla_absorb.py), so both give the same bits."""
    i = tl.arange(0, BLOCK_HALF)
    im = i < HALF
    ok = (row_ok & head_ok)[:, :, None]
    cs = cs_st * rows[:, :, None] + i[None, None, :]
    c = tl.load(cos_ptr + cs, mask=ok & im[None, None, :], other=0.0)
    s = tl.load(sin_ptr + cs, mask=ok & im[None, None, :], other=0.0)
    base = q_ptr + rows[:, :, None] * q_st + heads[:, :, None] * q_sh
    qm = ok & im[None, None, :]
    q1, q2 = _rope_pair(base, i[None, None, :], qm, HALF, INTERLEAVED)
    out = qo_ptr + rows[:, :, None] * qo_st + heads[:, :, None] * qo_sh + i[None, None, :]
    tl.store(out, (q1 * c - q2 * s).to(qo_ptr.dtype.element_ty), mask=qm)
    tl.store(out + HALF, (q2 * c + q1 * s).to(qo_ptr.dtype.element_ty), mask=qm)
    if REST > 0:
        r = tl.arange(0, BLOCK_REST)
        qrm = ok & (r < REST)[None, None, :]
        tail = tl.load(base + 2 * HALF + r[None, None, :], mask=qrm)
        tl.store(qo_ptr + rows[:, :, None] * qo_st + heads[:, :, None] * qo_sh + 2 * HALF + r[None, None, :], tail,
                 mask=qrm)


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
    kv_row(t, ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, ckv_st, cs_st, cache_ss, eps,
           L, BLOCK_L, HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST)
    h = tl.arange(0, BLOCK_H)[None, :]  # q_pe of every head: a [1, BLOCK_H] grid of (token t, head h)
    rows = t + tl.zeros([1, BLOCK_H], dtype=tl.int64)
    rope_heads(rows, rows >= 0, h, h < num_heads, q_ptr, qo_ptr, cos_ptr, sin_ptr, q_st, q_sh, qo_st, qo_sh, cs_st,
               HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST)


@triton.jit
def _mla_prep_kernel(
    ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, qa_ptr, qaw_ptr, qay_ptr, qaq_ptr, qas_ptr,
    ckv_st, cs_st, cache_ss, qa_st, qay_st, qaq_st, QA, eps, qa_eps,
    L: tl.constexpr, BLOCK_L: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_QA: tl.constexpr,
    QUANT: tl.constexpr, PRE_ROUND: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per token: its cache entry (as _mla_kv_write_kernel) and q_a's RMSNorm (+ FP8 form) row."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    kv_row(t, ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, ckv_st, cs_st, cache_ss, eps,
           L, BLOCK_L, HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST)
    cols = tl.arange(0, BLOCK_QA)
    mask = cols < QA
    x = tl.load(qa_ptr + t * qa_st + cols, mask=mask, other=0.0)
    norm_row(x, t, cols, mask, qaw_ptr, qay_ptr, qaq_ptr, qas_ptr, qay_st, qaq_st, QA, qa_eps, QUANT, PRE_ROUND)


def rope_meta(cos: torch.Tensor, sin: torch.Tensor, t: int, r: int, rotary_dim: int, interleaved: bool) -> dict:
    """Checks cos/sin [T, rotary_dim / 2] for RoPE on the first rotary_dim of R dims -> the constexprs of rope_heads
    (and kv_row's k_pe rotation): HALF, BLOCK_HALF, INTERLEAVED, REST, BLOCK_REST."""
    check(0 < rotary_dim <= r and rotary_dim % 2 == 0, "0 < rotary_dim <= R even")
    half = rotary_dim // 2
    check(cos.shape == (t, half) and sin.shape == cos.shape and cos.stride() == sin.stride() and cos.stride(1) == 1,
          "cos/sin [T, rotary_dim / 2]")
    return dict(HALF=half, BLOCK_HALF=max(2, next_pow2(half)), INTERLEAVED=bool(interleaved), REST=r - rotary_dim,
                BLOCK_REST=max(2, next_pow2(r - rotary_dim)))


def kv_meta(ckv: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            cache: torch.Tensor, slot_mapping: torch.Tensor, rotary_dim: int, interleaved: bool) -> dict:
    """Checks the cache-write operands of kv_row -> its constexprs (L, BLOCK_L and rope_meta's)."""
    t, lora = ckv.shape[0], norm_weight.shape[0]
    r = ckv.shape[1] - lora
    check(ckv.dim() == 2 and ckv.stride(1) == 1, "ckv must be [T, L + R] rows")
    check(torch.promote_types(ckv.dtype, norm_weight.dtype) == ckv.dtype, "norm weight wider than ckv")
    check(cache.dim() == 3 and cache.shape[1:] == (1, lora + r) and cache.stride(2) == 1, "cache [slots, 1, L + R]")
    check(slot_mapping.shape == (t,), "one slot a token")
    return dict(L=lora, BLOCK_L=next_pow2(lora), **rope_meta(cos, sin, t, r, rotary_dim, interleaved))


def mla_kv_write(ckv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 cache: torch.Tensor, slot_mapping: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor,
                 rotary_dim: int, interleaved: bool) -> None:
    """shared.model.ops.mla_kv_write_ref's signature and effect (see the module docstring)."""
    meta = kv_meta(ckv, norm_weight, cos, sin, cache, slot_mapping, rotary_dim, interleaved)
    t, r = ckv.shape[0], ckv.shape[1] - meta["L"]
    check(q_pe.shape == q_out.shape and q_pe.shape[::2] == (t, r), "token counts")
    check(q_pe.stride(2) == 1 and q_out.stride(2) == 1 and q_out.dtype == q_pe.dtype, "q_pe / q_out last dim")
    if t == 0:
        return
    _mla_kv_write_kernel[(t,)](
        ckv, norm_weight, cos, sin, cache, slot_mapping, q_pe, q_out,
        ckv.stride(0), cos.stride(0), cache.stride(0), q_pe.stride(0), q_pe.stride(1), q_out.stride(0),
        q_out.stride(1), q_pe.shape[1], float(eps), BLOCK_H=next_pow2(q_pe.shape[1]), num_warps=4,
        **meta, **pdl_kw(ckv.device, t),
    )


def mla_prep(q_a: torch.Tensor, q_a_weight: torch.Tensor, q_a_eps: float, ckv: torch.Tensor,
             norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
             slot_mapping: torch.Tensor, rotary_dim: int, interleaved: bool, quant: bool):
    """shared.model.ops.mla_prep_ref's signature and effect: the cache write of mla_kv_write (no query RoPE) and
    q_a's RMSNorm in one launch -> (rms_norm(q_a) [T, Lq], its per-token FP8 form (q, scale) when quant, else
    None). q_a [T, Lq] and ckv [T, L + R]: rows of the fused q_a / kv_a GEMM output (any row stride)."""
    t, lq = q_a.shape
    check(q_a.stride(1) == 1 and ckv.shape[0] == t and q_a_weight.shape == (lq,) and q_a_weight.is_contiguous(),
          "q_a must be [T, Lq] rows with a [Lq] weight")
    meta = kv_meta(ckv, norm_weight, cos, sin, cache, slot_mapping, rotary_dim, interleaved)
    y = new_out((t, lq), torch.promote_types(q_a.dtype, q_a_weight.dtype), q_a.device)
    q = new_out((t, lq), FP8_DTYPE, q_a.device) if quant else y
    qs = new_out((t, 1), torch.float32, q_a.device) if quant else y
    if t:
        _mla_prep_kernel[(t,)](
            ckv, norm_weight, cos, sin, cache, slot_mapping, q_a, q_a_weight, y, q, qs,
            ckv.stride(0), cos.stride(0), cache.stride(0), q_a.stride(0), y.stride(0), q.stride(0), lq, float(eps),
            float(q_a_eps), BLOCK_QA=next_pow2(lq), QUANT=quant, PRE_ROUND=INTERPRET, num_warps=4,
            **meta, **pdl_kw(ckv.device, t),
        )
    return y, ((q, qs) if quant else None)
