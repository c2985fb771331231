"""RMSNorm and fused residual-add + RMSNorm (Triton on CUDA; torch reference beside). All worker ranks.

HF semantics (spec §1.2): y = w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype). The fused form
first computes s = x + residual in x.dtype (one rounding, as torch does) and returns (norm(s), s).
The fused form also takes x in the MoE's slot form [T, S, D] (the fused experts' weighted per-slot
outputs, ops.fused_experts(keep_slots=True) at TP 1): x = sum of the S rows in fp32, one rounding to
x.dtype (what kernels.fused_moe's slot sum wrote before), then the add: one launch instead of two.
One program normalises one row of D elements (D <= 16384; GLM rows are 128 .. 5120 wide).
Bytes: read x (+ residual) and w, write y (+ s): memory-bound, one pass.
The _fp8 forms also quantize y per token for the next W8A8 GEMM (as kernels.act_quant.quant_fp8_per_token
on y, from the same registers: one launch fewer) -> (..., q [T, D] e4m3, scale [T, 1] fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import FP8_DTYPE, INTERPRET, new_out, check, fp8_grid_round, next_pow2, pdl_enter, pdl_kw


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps):
    if x.dim() == residual.dim() + 1:  # slot form [T, S, D]
        x = x.float().sum(-2).to(x.dtype)
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, q_ptr, qs_ptr,
    x_stride, res_stride, y_stride, s_stride, q_stride, D, eps, slot_stride,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, PRE_ROUND: tl.constexpr, BLOCK_D: tl.constexpr,
    SLOTS: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if SLOTS > 1:  # slot form: x row = sum of SLOTS rows slot_stride apart, fp32, one rounding
        xs = x.to(tl.float32)
        for j in tl.static_range(1, SLOTS):  # unrolled: the SLOTS row loads are issued together
            xs += tl.load(x_ptr + row * x_stride + j * slot_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = xs.to(x.dtype)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounds like torch's x + residual
        tl.store(s_ptr + row * s_stride + cols, x, mask=mask)
    norm_row(x, row, cols, mask, w_ptr, y_ptr, q_ptr, qs_ptr, y_stride, q_stride, D, eps, QUANT, PRE_ROUND)


@triton.jit
def norm_row(x, row, cols, mask, w_ptr, y_ptr, q_ptr, qs_ptr, y_stride, q_stride, D, eps,
             QUANT: tl.constexpr, PRE_ROUND: tl.constexpr):
    """Row `row` of RMSNorm's output from its loaded values x [BLOCK_D] (cols, mask): y stored, and with QUANT
    its per-token FP8 form (q, scale) from the same registers. Shared by every kernel that normalises a row
    (here, kernels/mla_kv_write.py's prep), so they all give rms_norm(_fp8)'s bits."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # cast back before the weight, as HF does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (normed * w).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * y_stride + cols, y, mask=mask)
    if QUANT:  # per-token FP8 of y as stored (quant_fp8_per_token's arithmetic)
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        scale = tl.maximum(tl.max(tl.abs(yf), axis=0) / 448.0, 1e-12)
        tl.store(qs_ptr + row, scale)
        q = tl.clamp(yf / scale, -448.0, 448.0)
        if PRE_ROUND:
            q = fp8_grid_round(q)
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    check(x.stride(-1) == 1, "last dim must be contiguous")
    return x.reshape(-1, x.shape[-1])


def _launch(x, residual, weight, eps, out=None, quant: bool = False):
    d = x.shape[-1]
    check(weight.shape == (d,) and weight.is_contiguous(), f"weight must be [{d}] contiguous")
    check(d <= 16384, "row too wide for one program")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    slots, slot_stride = 1, 0
    if residual is not None and x.dim() == residual.dim() + 1:  # slot form [T, S, D]: sum the S rows
        check(x.dim() == 3 and x.stride(-1) == 1, "slot form must be [T, S, D] with D contiguous")
        slots, slot_stride = x.shape[1], x.stride(1)
        x = x[:, 0]  # [T, D] view: row t's first slot; the kernel walks the rest
    x2 = _rows(x)
    if out is None:
        y = new_out(x2.shape, dtype=out_dtype, device=x.device)
    else:  # rows of a wider buffer: [T, D] with any row stride
        check(out.dim() == 2 and out.shape == x2.shape and out.dtype == out_dtype and out.stride(1) == 1,
              "out must be [T, D] rows of the output dtype, last dim contiguous")
        y = out
    res2 = s = None
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x")
        res2 = _rows(residual)
        s = new_out(x2.shape, x2.dtype, x2.device)
    n_rows = x2.shape[0]
    q = qs = None
    if quant:
        q = new_out(x2.shape, FP8_DTYPE, x2.device)
        qs = new_out((n_rows, 1), torch.float32, x2.device)
    if n_rows:
        block = next_pow2(d)
        _rms_norm_kernel[(n_rows,)](
            x2, res2 if res2 is not None else x2, weight, y, s if s is not None else y,
            q if quant else y, qs if quant else y,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0),
            s.stride(0) if s is not None else 0, q.stride(0) if quant else 0, d, float(eps), slot_stride,
            HAS_RES=residual is not None, QUANT=quant, PRE_ROUND=INTERPRET, BLOCK_D=block, SLOTS=slots,
            **pdl_kw(x2.device, n_rows),
            num_warps=min(16, max(1, block // 256)),
        )
    y = y.view(x.shape)
    return y, (s.view(x.shape) if s is not None else None), ((q, qs) if quant else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., D] (last dim contiguous), weight: [D] -> [..., D]; with `out` ([T, D] rows, any row
    stride, e.g. a slice of a wider buffer; x then [T, D]) the result is written there."""
    return _launch(x, None, weight, eps, out)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual), both shaped like residual; x [T, D] or the slot form [T, S, D]."""
    return _launch(x, residual, weight, eps)[:2]


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [T, D] -> (y [T, D], (q [T, D] e4m3, scale [T, 1] fp32)): y = rms_norm(x), q * scale ~= y."""
    y, _, q = _launch(x, None, weight, eps, quant=True)
    return y, q


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [T, D] (or the slot form [T, S, D]), residual [T, D] -> (rms_norm(x + residual), x + residual,
    (q, scale) of the former)."""
    return _launch(x, residual, weight, eps, quant=True)


def add_rms_norm_maybe_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool):
    """add_rms_norm_fp8 where the consumer wants the FP8 form (quant), else add_rms_norm's two outputs and None:
    -> (y, s, (q, scale) or None). The fallback of the ops that fuse this norm into another launch."""
    if quant:
        return add_rms_norm_fp8(x, residual, weight, eps)
    return (*add_rms_norm(x, residual, weight, eps), None)
