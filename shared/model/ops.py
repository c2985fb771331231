"""Every model op that gets a Triton kernel on CUDA, with its plain-torch implementation (all worker ranks).

The layers call only these functions. The CPU/GPU choice happens here, once: `set_backend` (called by the
kernels package or the model runner) may replace entries of `IMPL` with Triton launchers; the torch
versions below are the reference every kernel is tested against. Shapes use T tokens, B sequences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from glmserve.shared.runner.batch import ForwardBatch

FP8_MAX = 448.0  # e4m3fn


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """HF RMSNorm: normalise in fp32, cast back to x.dtype, then multiply by weight. x: [..., D]. With
    `out` (x's shape, any strides) the result is written there and returned."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype) if out is None else torch.mul(weight, y.to(x.dtype), out=out)


def rms_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, None]:
    """(rms_norm(x), its per-token FP8 form or None). The references run FP8 layers on dequantized weights
    with unquantized activations, so they make no FP8 form (None: the consumer quantizes if it wants one);
    the CUDA kernel returns (q [T, D] e4m3, scale [T, 1] fp32) made from the same registers."""
    return rms_norm_ref(x, weight, eps), None


def add_rms_norm_fp8_ref(x, residual, weight, eps):
    """(rms_norm(x + residual), x + residual, FP8 form of the former or None) — see rms_norm_fp8_ref."""
    return (*add_rms_norm_ref(x, residual, weight, eps), None)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); both [T, D]. x may be the MoE's slot form [T, S, D]
    (fused_experts(keep_slots=True)): its S rows are summed in fp32 and rounded once to x.dtype first."""
    if x.dim() == residual.dim() + 1:
        x = x.float().sum(-2).to(x.dtype)
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rope_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate dims [0, rotary_dim) of x [T, heads, D]; cos/sin: [T, rotary_dim // 2] fp32. With `out`
    (x's shape, any strides, e.g. a slice of a wider buffer) the result is written there and returned.

    NeoX (interleaved=False): dim j pairs with j + rotary_dim/2. Interleaved (GPT-J, MLA): dims (2i, 2i+1)
    pair, and the result is written de-interleaved [rot_even..., rot_odd...] exactly as HF does (q and k get
    the same permutation, so q.k is that of the true interleaved rotation).
    """
    c = cos[:, None, :].to(x.dtype)
    s = sin[:, None, :].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    res = torch.cat([torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1), rest], dim=-1)
    return res if out is None else out.copy_(res)


def mla_kv_write_ref(
    ckv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
    cache: torch.Tensor, slot_mapping: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor, rotary_dim: int,
    interleaved: bool,
) -> None:
    """MLA's cache write and query RoPE (one kernel on CUDA, kernels/mla_kv_write.py):
    cache[slot_mapping[t], 0] = [rms_norm(ckv[t, :L]) | rope(ckv[t, L:])] and q_out = rope(q_pe).
    ckv [T, L + R] (L = norm_weight's length), cos/sin [T, rotary_dim / 2] fp32 (RoPE on the first rotary_dim
    of the R dims, the rest pass through), cache [num_slots, 1, L + R], slot_mapping [T] int64,
    q_pe / q_out [T, h, R] (q_out may be a strided slice of a wider buffer)."""
    lora, t = norm_weight.shape[0], ckv.shape[0]
    kv_new = torch.empty(t, ckv.shape[1], device=ckv.device, dtype=torch.promote_types(ckv.dtype, norm_weight.dtype))
    rms_norm_ref(ckv[:, :lora], norm_weight, eps, out=kv_new[:, :lora])
    rope_ref(ckv[:, None, lora:], cos, sin, rotary_dim, interleaved, out=kv_new[:, None, lora:])
    cache.index_copy_(0, slot_mapping, kv_new[:, None].to(cache.dtype))
    rope_ref(q_pe, cos, sin, rotary_dim, interleaved, out=q_out)


def mla_prep_ref(q_a: torch.Tensor, q_a_weight: torch.Tensor, q_a_eps: float, ckv: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                 slot_mapping: torch.Tensor, rotary_dim: int, interleaved: bool, quant: bool):
    """MLA's work between the fused q_a / kv_a GEMM and q_b_proj (one kernel on CUDA, kernels/mla_kv_write.py):
    mla_kv_write_ref's cache write (not the query RoPE: mla_absorb's rope does that) and q_a's RMSNorm ->
    (rms_norm(q_a) [T, Lq], its per-token FP8 form or None: see rms_norm_fp8_ref; quant asks the kernel
    for it). q_a [T, Lq], ckv [T, L + R]."""
    lora, t = norm_weight.shape[0], ckv.shape[0]
    kv_new = torch.empty(t, ckv.shape[1], device=ckv.device, dtype=torch.promote_types(ckv.dtype, norm_weight.dtype))
    rms_norm_ref(ckv[:, :lora], norm_weight, eps, out=kv_new[:, :lora])
    rope_ref(ckv[:, None, lora:], cos, sin, rotary_dim, interleaved, out=kv_new[:, None, lora:])
    cache.index_copy_(0, slot_mapping, kv_new[:, None].to(cache.dtype))
    return rms_norm_ref(q_a, q_a_weight, q_a_eps), None


def mla_absorb_ref(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, k_rows: bool,
                   out: torch.Tensor, rope=None, kv_write=None) -> torch.Tensor:
    """MLA's absorbed up-projections (one kernel on CUDA, kernels/mla_absorb.py): per head h,
    out[:, h] = a[:, h] @ Wd[h] (k_rows: W_UK, K = W's rows) or a[:, h] @ Wd[h]^T (W_UV, K = W's columns).
    a [T, h, K]; w [h, R, C] (a view of kv_b_proj's weight rows), fp8 with per-row scales w_scale [h, R]
    (dequantized as Wd = (float(w) * s).to(a.dtype)) or a.dtype with None; out [T, h, N], any strides -> out.
    rope (q_pe [T, h, R], cos, sin, q_out [T, h, R], rotary_dim, interleaved): also q_out = rope(q_pe) (the
    query RoPE mla_prep leaves out; the W_UK launch does it on CUDA). kv_write (mla_kv_write_ref's arguments): that
    op's cache write and query RoPE too (on CUDA by programs of the same launch)."""
    if kv_write is not None:
        mla_kv_write_ref(*kv_write)
    wd = w if w_scale is None else w.float() * w_scale.float()[..., None]
    wd = wd.to(a.dtype)
    torch.bmm(a.transpose(0, 1), wd if k_rows else wd.transpose(1, 2), out=out.transpose(0, 1))
    if rope is not None:
        q_pe, cos, sin, q_out, rotary_dim, interleaved = rope
        rope_ref(q_pe, cos, sin, rotary_dim, interleaved, out=q_out)
    return out


def gqa_kv_write_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
    interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """GQA attention's prologue (one kernel on CUDA, kernels/gqa_kv_write.py): per-head RMSNorm of q and k
    when the weights are given (use_qk_norm), RoPE of both, K and V written at the tokens' cache slots.
    q [T, Hq, D], k / v [T, Hkv, D], cos/sin [T, rotary_dim / 2] fp32, caches [num_slots, Hkv, D],
    slot_mapping [T] int64 -> the roped q [T, Hq, D]."""
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q, k = rope_ref(q, cos, sin, rotary_dim, interleaved), rope_ref(k, cos, sin, rotary_dim, interleaved)
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_route_ref(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
    shared_slot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM noaux_tc router (spec §1.2): -> (weights [T, k] fp32, expert ids [T, k] int64).
    shared_slot: one more slot, last, routes every token to expert E (the shared expert stacked after
    the E routed ones by MoE's shared-expert fusion) with weight 1.0: -> [T, k + 1].

    fp32 sigmoid scores; the correction bias only picks experts; group score = sum of the top-2 biased
    scores in the group, keep topk_group groups; weights from unbiased scores, renormalised, then scaled.
    """
    scores = F.linear(hidden.float(), gate_weight.float()).sigmoid()  # [T, E]
    choice = scores + correction_bias.float()
    num_tokens, num_experts = choice.shape
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [T, n_group]
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        mask = mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if shared_slot:
        weights = torch.cat([weights, torch.ones_like(weights[:, :1])], dim=1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], num_experts)], dim=1)
    return weights, ids


def moe_route_align_ref(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                        shared_slot, num_slots, fp8):
    """moe_route, plus the (token, slot) pairs sorted by expert for fused_experts over num_slots experts (fp8:
    its FP8 config) when one launch did both: -> (weights, ids, aligned | None). The reference sorts nothing:
    aligned is None (fused_experts aligns)."""
    return (*moe_route_ref(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                           scaling, shared_slot), None)


def add_rms_norm_route_align_ref(x, residual, norm_weight, eps, quant, gate_weight, correction_bias, top_k, n_group,
                                 topk_group, norm_topk_prob, scaling, shared_slot, num_slots, fp8):
    """The post-attention norm, then the router of its output: (y, s, y_fp8) = add_rms_norm(_fp8)(x, residual,
    norm_weight, eps) (quant: the FP8 form wanted; see add_rms_norm_fp8_ref) and moe_route_align(y, ...) ->
    (y, s, y_fp8, weights, ids, aligned). The CUDA kernel may do both in one launch (kernels.moe_route_align)."""
    y, s, y_fp8 = _add_rms_norm_maybe_fp8(x, residual, norm_weight, eps, quant)
    return (y, s, y_fp8, *moe_route_align(y, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                                          scaling, shared_slot, num_slots, fp8))


def fused_experts_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, shared_last: bool = False,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, keep_slots: bool = False, aligned=None,
) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e x) * up_e x), e = ids[t, j]. x_fp8 (x's per-token FP8 form,
    from a fused norm) is for the W8A8 kernel; this reference keeps activations unquantized and ignores it.

    shared_last: a promise that ids[:, -1] == E - 1 (MoE's fused shared expert) for every token and no other
    slot holds E - 1; the math is the same (the kernels use it to skip sorting that expert's pairs).
    x: [T, H]; w13: [E, 2I, H] ([gate; up] rows); w2: [E, H, I]; weights: [T, k] fp32; ids: [T, k].
    FP8 experts: w13/w2 are e4m3 with per-row scales w13_scale [E, 2I, 1], w2_scale [E, H, 1]
    (this reference dequantizes the weights and keeps activations unquantized).
    Returns [T, H] in x.dtype (this rank's partial sum when I is TP-split); keep_slots: the weighted per-slot
    outputs [T, k, H] in x.dtype instead, unsummed ("slot form": the next add_rms_norm sums them, TP 1).
    aligned: the pairs already sorted by expert for the kernel (moe_route_align's third output); the math is
    the same, this reference ignores it.
    """
    if w13_scale is not None:
        w13 = (w13.float() * w13_scale.float()).to(x.dtype)
        w2 = (w2.float() * w2_scale.float()).to(x.dtype)
    flat_ids = ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])
    flat_w = weights.reshape(-1)
    # [T, H] fp32 sum, or [T * k, H] per pair (pair t * k + j) for the slot form
    out = torch.zeros((flat_ids.numel() if keep_slots else x.shape[0], x.shape[1]), dtype=torch.float32,
                      device=x.device)
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        tok = token_of[sel]
        h = silu_and_mul_ref(x[tok] @ w13[e].t()) @ w2[e].t()  # [n, H]
        out.index_add_(0, sel if keep_slots else tok, h.float() * flat_w[sel, None])
    return out.to(x.dtype).view(x.shape[0], ids.shape[1], -1) if keep_slots else out.to(x.dtype)


def fused_experts_norm_ref(x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, aligned, residual,
                           norm_weight, eps, quant):
    """The MoE's slot form (fused_experts(keep_slots=True)), then the next layer's input norm of it: -> (y, s,
    y_fp8) = add_rms_norm(_fp8)(slots, residual, norm_weight, eps) (quant: the FP8 form wanted). The CUDA kernels
    may run the norm inside the down GEMV's launch (kernels.fused_moe.NEXT_NORM_MAX_T)."""
    slots = fused_experts(x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, True, aligned)
    return _add_rms_norm_maybe_fp8(slots, residual, norm_weight, eps, quant)


def _add_rms_norm_maybe_fp8(x, residual, norm_weight, eps, quant: bool):
    """The ops add_rms_norm_fp8 (quant) or add_rms_norm with None for the FP8 form -> (y, s, y_fp8 | None)."""
    return add_rms_norm_fp8(x, residual, norm_weight, eps) if quant else (
        *add_rms_norm(x, residual, norm_weight, eps), None)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: "ForwardBatch",
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached tokens (new ones already written).

    q: [T, Hq, Dk]; k_cache: [num_slots, Hkv, Dk]; v_cache: [num_slots, Hkv, Dv] (may be a view of k_cache);
    batch gives query_start_loc / seq_lens / page_table [B, max_pages] (and their host copies).
    Query row j of sequence i sits at position prefix_lens[i] + j. Returns [T, Hq, Dv] in q.dtype.
    """
    num_heads, num_kv = q.shape[1], k_cache.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v_cache.shape[-1])
    start = 0
    for i, (q_len, prefix_len) in enumerate(zip(batch.query_lens_cpu, batch.prefix_lens_cpu)):
        end, seq_len = start + q_len, prefix_len + q_len
        if q_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)
        slots = batch.page_table[i, pos // page_size].long() * page_size + pos % page_size
        k = k_cache[slots].repeat_interleave(num_heads // num_kv, dim=1)  # [S, Hq, Dk]
        v = v_cache[slots].repeat_interleave(num_heads // num_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k.float()) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
        start = end
    return out


def quant_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (x_fp8 [T, K] e4m3, scale [T, 1] fp32) with x ~= x_fp8 * scale."""
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_ref(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """FP8 weight linear, CPU path: dequantize W = w_fp8 * w_scale (w_fp8 [N, K] e4m3, w_scale [N, 1] fp32)
    and run y = x W^T (+ bias) in x.dtype. CUDA swaps in the W8A8 kernel (`fp8_linear_w8a8_ref` semantics),
    which takes x's per-token FP8 form `x_fp8` when a fused norm made it; this path ignores it."""
    w = (w_fp8.float() * w_scale.float()).to(x.dtype)
    return F.linear(x, w, bias)


def fp8_linear_w8a8_ref(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 per-token x per-channel (the GPU kernel's reference): y = (q(x) . W^T) * s_x * s_w^T (+ bias)."""
    xq, xs = quant_fp8_per_token_ref(x.reshape(-1, x.shape[-1]))
    y = (xq.float() @ w_fp8.float().t()) * xs * w_scale.float().reshape(1, -1)
    y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    return y + bias if bias is not None else y


def rms_norm_fp8_linear_ref(
    x: torch.Tensor, norm_w: torch.Tensor, eps: float, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp8_linear(rms_norm(x, norm_w, eps), w_fp8, w_scale, bias): an RMSNorm whose only consumer is an FP8 GEMM
    (MLA's q_a norm before q_b). The CUDA kernel may do both in one launch (kernels.fp8_gemm.rms_norm_fp8_linear)."""
    return fp8_linear_ref(rms_norm_ref(x, norm_w, eps), w_fp8, w_scale, bias)


IMPL: dict[str, Callable] = {
    "rms_norm": rms_norm_ref,
    "add_rms_norm": add_rms_norm_ref,
    "rope": rope_ref,
    "mla_kv_write": mla_kv_write_ref,
    "mla_prep": mla_prep_ref,
    "mla_absorb": mla_absorb_ref,
    "gqa_kv_write": gqa_kv_write_ref,
    "silu_and_mul": silu_and_mul_ref,
    "moe_route": moe_route_ref,
    "moe_route_align": moe_route_align_ref,
    "add_rms_norm_route_align": add_rms_norm_route_align_ref,
    "fused_experts": fused_experts_ref,
    "fused_experts_norm": fused_experts_norm_ref,
    "paged_attention": paged_attention_ref,
    "quant_fp8_per_token": quant_fp8_per_token_ref,
    "fp8_linear": fp8_linear_ref,
    "rms_norm_fp8_linear": rms_norm_fp8_linear_ref,
    "rms_norm_fp8": rms_norm_fp8_ref,
    "add_rms_norm_fp8": add_rms_norm_fp8_ref,
}


def set_impl(name: str, fn: Callable) -> None:
    """Swap one op (kernels package on CUDA). Same signature and semantics as the *_ref function."""
    if name not in IMPL:
        raise KeyError(f"unknown op {name!r}; ops: {sorted(IMPL)}")
    IMPL[name] = fn


def rms_norm(x, weight, eps, out=None):
    return IMPL["rms_norm"](x, weight, eps, out)


def add_rms_norm(x, residual, weight, eps):
    return IMPL["add_rms_norm"](x, residual, weight, eps)


def rms_norm_fp8(x, weight, eps):
    return IMPL["rms_norm_fp8"](x, weight, eps)


def add_rms_norm_fp8(x, residual, weight, eps):
    return IMPL["add_rms_norm_fp8"](x, residual, weight, eps)


def rope(x, cos, sin, rotary_dim, interleaved, out=None):
    return IMPL["rope"](x, cos, sin, rotary_dim, interleaved, out)


def mla_kv_write(ckv, norm_weight, eps, cos, sin, cache, slot_mapping, q_pe, q_out, rotary_dim, interleaved):
    return IMPL["mla_kv_write"](ckv, norm_weight, eps, cos, sin, cache, slot_mapping, q_pe, q_out, rotary_dim,
                                interleaved)


def mla_prep(q_a, q_a_weight, q_a_eps, ckv, norm_weight, eps, cos, sin, cache, slot_mapping, rotary_dim, interleaved,
             quant):
    return IMPL["mla_prep"](q_a, q_a_weight, q_a_eps, ckv, norm_weight, eps, cos, sin, cache, slot_mapping,
                            rotary_dim, interleaved, quant)


def mla_absorb(a, w, w_scale, k_rows, out, rope=None, kv_write=None):
    return IMPL["mla_absorb"](a, w, w_scale, k_rows, out, rope, kv_write)


def gqa_kv_write(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, rotary_dim, interleaved, k_cache, v_cache,
                 slot_mapping):
    return IMPL["gqa_kv_write"](q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, rotary_dim, interleaved,
                                k_cache, v_cache, slot_mapping)


def silu_and_mul(x):
    return IMPL["silu_and_mul"](x)


def moe_route(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
              shared_slot=False):
    return IMPL["moe_route"](hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                             shared_slot)


def moe_route_align(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
                    shared_slot, num_slots, fp8):
    return IMPL["moe_route_align"](hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                                   scaling, shared_slot, num_slots, fp8)


def add_rms_norm_route_align(x, residual, norm_weight, eps, quant, gate_weight, correction_bias, top_k, n_group,
                             topk_group, norm_topk_prob, scaling, shared_slot, num_slots, fp8):
    return IMPL["add_rms_norm_route_align"](x, residual, norm_weight, eps, quant, gate_weight, correction_bias, top_k,
                                            n_group, topk_group, norm_topk_prob, scaling, shared_slot, num_slots, fp8)


def fused_experts(x, w13, w2, weights, ids, w13_scale=None, w2_scale=None, shared_last=False, x_fp8=None,
                  keep_slots=False, aligned=None):
    return IMPL["fused_experts"](x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, keep_slots,
                                 aligned)


def fused_experts_norm(x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, aligned, residual,
                       norm_weight, eps, quant):
    return IMPL["fused_experts_norm"](x, w13, w2, weights, ids, w13_scale, w2_scale, shared_last, x_fp8, aligned,
                                      residual, norm_weight, eps, quant)


def paged_attention(q, k_cache, v_cache, batch, page_size, scale):
    return IMPL["paged_attention"](q, k_cache, v_cache, batch, page_size, scale)


def fp8_linear(x, w_fp8, w_scale, bias, x_fp8=None):
    return IMPL["fp8_linear"](x, w_fp8, w_scale, bias, x_fp8)


def rms_norm_fp8_linear(x, norm_w, eps, w_fp8, w_scale, bias):
    return IMPL["rms_norm_fp8_linear"](x, norm_w, eps, w_fp8, w_scale, bias)
