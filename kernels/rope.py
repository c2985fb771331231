"""Rotary position embedding on q and k (Triton on CUDA; the torch reference is shared/model/ops.py::
rope_ref, the CPU model's). All worker ranks.

Rotates dims [0, rotary_dim) of every head; the rest pass through.
- NeoX (glm4_moe): dim j pairs with j + rotary_dim/2.
- Interleaved (MLA rope dims): dims (2i, 2i+1) pair; the result is written de-interleaved
  [rot_even..., rot_odd...] as HF does (q and k get the same permutation, so q.k is unchanged).
out1 = x1 * cos - x2 * sin; out2 = x2 * cos + x1 * sin (fp32 math, one rounding at the store).
cos/sin come either per token ([T, rotary_dim/2]) or from a cache indexed by positions
([max_pos, rotary_dim/2] each). One program rotates BLOCK_H heads of one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, new_out, next_pow2, rope_pair, pdl_enter, pdl_kw


def cos_sin_cache(rotary_dim: int, max_pos: int, theta: float, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) each [max_pos, rotary_dim // 2] fp32 with inv_freq[i] = theta^(-2i / rotary_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
    x_stride_t, x_stride_h, out_stride_t, out_stride_h, cs_stride, num_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    if HAS_POS:
        cs_row = tl.load(pos_ptr + tok).to(tl.int64)
    else:
        cs_row = tok
    c = tl.load(cos_ptr + cs_row * cs_stride + i, mask=i < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + cs_row * cs_stride + i, mask=i < HALF, other=0.0).to(tl.float32)
    mask = (heads[:, None] < num_heads) & (i[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
    base = x_ptr + tok * x_stride_t + heads[:, None] * x_stride_h
    i1, i2 = rope_pair(i[None, :], HALF, INTERLEAVED)
    x1 = tl.load(base + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    obase = out_ptr + tok * out_stride_t + heads[:, None] * out_stride_h
    tl.store(obase + i[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + i[None, :] + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)
    if REST > 0:  # out-of-place: copy the pass-through dims [2 * HALF, 2 * HALF + REST)
        r = tl.arange(0, BLOCK_REST)
        rmask = (heads[:, None] < num_heads) & (r[None, :] < REST)
        tail = tl.load(base + 2 * HALF + r[None, :], mask=rmask, other=0.0)
        tl.store(obase + 2 * HALF + r[None, :], tail, mask=rmask)


def _launch(x, out, cos, sin, positions, rotary_dim, interleaved, rest: int = 0):
    check(x.dim() == 3 and x.stride(2) == 1, "x must be [T, heads, D] with contiguous D")
    check(rotary_dim % 2 == 0 and rotary_dim <= x.shape[2], "bad rotary_dim")
    half = rotary_dim // 2
    check(cos.shape[-1] == half and sin.shape == cos.shape, f"cos/sin must be [*, {half}]")
    check(cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0), "cos/sin must be row-major alike")
    if positions is None:
        check(cos.shape[0] == x.shape[0], "per-token cos/sin need T rows")
    num_tokens, num_heads = x.shape[0], x.shape[1]
    if num_tokens == 0:
        return
    block_half = next_pow2(half)
    block_h = max(1, min(next_pow2(num_heads), 4096 // block_half))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rope_kernel[grid](
        x, cos, sin, positions if positions is not None else cos, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), num_heads,
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h,
        INTERLEAVED=bool(interleaved), HAS_POS=positions is not None,
        REST=rest, BLOCK_REST=next_pow2(rest) if rest else 1, num_warps=4, **pdl_kw(x.device, x.shape[0]),
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Out-of-place form with shared.model.ops' signature: cos/sin [T, rotary_dim // 2]; `out` (x's
    shape, any token / head strides, contiguous last dim) receives the result when given."""
    if out is None:
        out = new_out(x.shape, x.dtype, x.device)  # every element written: rotated dims + copied rest
    check(out.shape == x.shape and out.dtype == x.dtype and out.stride(2) == 1,
          "out must be like x, last dim contiguous")
    _launch(x, out, cos, sin, None, rotary_dim, interleaved, rest=x.shape[2] - rotary_dim)
    return out


def rope_inplace(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    rotary_dim: int, interleaved: bool,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place; positions [T] int index the caches [max_pos, rd/2]."""
    check(positions.shape == (q.shape[0],) and k.shape[0] == q.shape[0], "positions must be [T]")
    _launch(q, q, cos_cache, sin_cache, positions, rotary_dim, interleaved)
    _launch(k, k, cos_cache, sin_cache, positions, rotary_dim, interleaved)
