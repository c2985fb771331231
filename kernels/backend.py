"""Installs the Triton kernels into shared.model.ops for CUDA tensors (every worker rank, at start).

`install()` wraps each op so that CUDA inputs go to the kernel and anything else to the torch
reference that was in ops.IMPL before, so one process can still run CPU tensors (tests, tools).
Idempotent. Ops wired (same signatures as the *_ref functions in shared.model.ops):
rms_norm, add_rms_norm, rms_norm_fp8, add_rms_norm_fp8, rope, mla_kv_write, mla_prep, mla_absorb, gqa_kv_write, silu_and_mul,
moe_route, moe_route_align, add_rms_norm_route_align, fused_experts, fused_experts_norm, paged_attention,
quant_fp8_per_token, fp8_linear, rms_norm_fp8_linear.
"""

from __future__ import annotations

from typing import Callable

_INSTALLED: dict[str, Callable] = {}


def _kernels() -> dict[str, Callable]:
    from glmserve.kernels import (act_quant, fp8_gemm, fused_moe, gqa_kv_write, mla_absorb, mla_kv_write, moe_route,
                                  moe_route_align, paged_attention, rmsnorm, rope)

    def attention(q, k_cache, v_cache, batch, page_size, scale):
        out = paged_attention.paged_attention(q.to(k_cache.dtype), k_cache, v_cache, batch, page_size, scale)
        return out.to(q.dtype)

    return {
        "rms_norm": rmsnorm.rms_norm,
        "add_rms_norm": rmsnorm.add_rms_norm,
        "rms_norm_fp8": rmsnorm.rms_norm_fp8,
        "add_rms_norm_fp8": rmsnorm.add_rms_norm_fp8,
        "rope": rope.rope,
        "mla_kv_write": mla_kv_write.mla_kv_write,
        "mla_prep": mla_kv_write.mla_prep,
        "mla_absorb": mla_absorb.mla_absorb,
        "gqa_kv_write": gqa_kv_write.gqa_kv_write,
        "silu_and_mul": act_quant.silu_and_mul,
        "moe_route": moe_route.moe_route,
        "moe_route_align": moe_route_align.moe_route_align,
        "add_rms_norm_route_align": moe_route_align.add_rms_norm_route_align,
        "fused_experts": fused_moe.fused_experts,
        "fused_experts_norm": fused_moe.fused_experts_norm,
        "paged_attention": attention,
        "quant_fp8_per_token": act_quant.quant_fp8_per_token,
        "fp8_linear": fp8_gemm.fp8_linear,
        "rms_norm_fp8_linear": fp8_gemm.rms_norm_fp8_linear,
    }


def _on_device(kernel: Callable, ref: Callable) -> Callable:
    def op(x, *args):
        return kernel(x, *args) if x.is_cuda else ref(x, *args)

    op.kernel, op.ref = kernel, ref  # for tests and introspection
    return op


def install(force: bool = False) -> list[str]:
    """Swap the ops to the kernels (CUDA inputs only); returns the names wired."""
    from glmserve.shared.model import ops

    if _INSTALLED and not force:
        return sorted(_INSTALLED)
    for name, kernel in _kernels().items():
        if name not in ops.IMPL:
            continue
        ref = getattr(ops.IMPL[name], "ref", ops.IMPL[name])
        ops.set_impl(name, _on_device(kernel, ref))
        _INSTALLED[name] = kernel
    return sorted(_INSTALLED)
