"""SiLU-and-mul (optionally fused with per-token FP8 quantization) and FP8 activation quantizers.
Triton on CUDA, torch references beside; every worker rank.

- silu_and_mul: x [T, 2I] = [gate | up] -> silu(gate) * up [T, I] in x.dtype.
- silu_and_mul_fp8: same, then per token s_t = max(amax_t / 448, 1e-12), q = clamp(h / s_t) as e4m3
  -> (q [T, I] fp8, s [T, 1] fp32). I <= 4096: one pass, the row stays in registers; wider rows: two
  passes (amax, then store), the second re-reading x from L2. HBM: one read of x + one write of q.
- quant_fp8_per_token(x [T, K]) and quant_fp8_group(x [T, K], group=128) -> (q, scales [T, 1] or
  [T, cdiv(K, group)]): the W8A8 and block-scaled GEMM inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmserve.kernels._common import (new_out, FP8_DTYPE, FP8_MAX, INTERPRET, check, fp8_grid_round, next_pow2,
                                      pdl_enter, pdl_kw)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quant_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quant_fp8_group_ref(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    t, k = x.shape
    pad = (-k) % group
    xp = F.pad(x.float(), (0, pad)).view(t, -1, group)
    scale = (xp.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [T, G, 1]
    q = (xp / scale).clamp(-FP8_MAX, FP8_MAX).view(t, -1)[:, :k].to(FP8_DTYPE)
    return q, scale.squeeze(-1)


def silu_and_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_fp8_per_token_ref(silu_and_mul_ref(x))


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, scale_ptr, x_stride, out_stride, I,
    QUANT: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PRE_ROUND: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if QUANT and NUM_CHUNKS == 1:  # whole row in registers: one read of x, no second pass
        m = offs < I
        g = tl.load(x_ptr + row * x_stride + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * x_stride + I + offs, mask=m, other=0.0).to(tl.float32)
        h = ((g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32) * u).to(x_ptr.dtype.element_ty)
        scale = tl.maximum(tl.max(tl.abs(h.to(tl.float32)), axis=0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        h = tl.clamp(h.to(tl.float32) * (1.0 / scale), -448.0, 448.0)
        if PRE_ROUND:
            h = fp8_grid_round(h)
        tl.store(out_ptr + row * out_stride + offs, h.to(out_ptr.dtype.element_ty), mask=m)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    inv = 1.0
    if QUANT:
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            m = cols < I
            g = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + row * x_stride + I + cols, mask=m, other=0.0).to(tl.float32)
            h = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32) * u
            amax = tl.maximum(amax, tl.abs(h.to(x_ptr.dtype.element_ty).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        tl.store(scale_ptr + row, scale)
        inv = 1.0 / scale
    for c in range(NUM_CHUNKS):
        cols = c * BLOCK + offs
        m = cols < I
        g = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * x_stride + I + cols, mask=m, other=0.0).to(tl.float32)
        # rounded like torch: silu(gate) in x.dtype, then the product in x.dtype
        h = ((g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32) * u).to(x_ptr.dtype.element_ty)
        if QUANT:
            h = tl.clamp(h.to(tl.float32) * inv, -448.0, 448.0)
            if PRE_ROUND:
                h = fp8_grid_round(h)
        tl.store(out_ptr + row * out_stride + cols, h.to(out_ptr.dtype.element_ty), mask=m)


SILU_WARPS = 0  # 0: by row width (quant: 4 warps for a 2048-wide row, H100 sweep); the sweep overrides it


def _silu_launch(x: torch.Tensor, quant: bool):
    check(x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0, "x must be [T, 2I], contiguous rows")
    t, i = x.shape[0], x.shape[1] // 2
    out = new_out((t, i), dtype=FP8_DTYPE if quant else x.dtype, device=x.device)
    scale = new_out((t, 1), dtype=torch.float32, device=x.device)
    if t:
        block = min(next_pow2(i), 4096 if quant else 2048)
        _silu_mul_kernel[(t,)](
            x, out, scale, x.stride(0), out.stride(0), i,
            QUANT=quant, BLOCK=block, NUM_CHUNKS=triton.cdiv(i, block), PRE_ROUND=INTERPRET,
            num_warps=SILU_WARPS or min(8, max(1, block // (512 if quant else 256))), **pdl_kw(x.device, t),
        )
    return out, scale


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _silu_launch(x, False)[0]


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _silu_launch(x, True)


@triton.jit
def _quant_group_kernel(
    x_ptr, q_ptr, s_ptr, x_stride, q_stride, s_stride, K,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, PRE_ROUND: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program quantizes one group of GROUP columns of one row (GROUP = K for per-token)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, BLOCK)
    m = (cols < K) & (tl.arange(0, BLOCK) < GROUP)
    x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row * s_stride + g, scale)
    q = tl.clamp(x / scale, -448.0, 448.0)
    if PRE_ROUND:
        q = fp8_grid_round(q)
    tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=m)


def quant_fp8_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q [T, K] e4m3, scales [T, cdiv(K, group)] fp32); group=K gives per-token."""
    check(x.dim() == 2 and x.stride(1) == 1, "x must be [T, K] with contiguous rows")
    t, k = x.shape
    check(group <= 16384, "group too wide")
    num_groups = triton.cdiv(k, group)
    q = new_out((t, k), dtype=FP8_DTYPE, device=x.device)
    s = new_out((t, num_groups), dtype=torch.float32, device=x.device)
    if t and k:
        block = next_pow2(group)
        _quant_group_kernel[(t, num_groups)](
            x, q, s, x.stride(0), q.stride(0), s.stride(0), k,
            GROUP=group, BLOCK=block, PRE_ROUND=INTERPRET, num_warps=min(16, max(1, block // 256)),
            **pdl_kw(x.device, t),
        )
    return q, s


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q [T, K] e4m3, scale [T, 1] fp32) with x ~= q * scale."""
    return quant_fp8_group(x, group=x.shape[-1])
