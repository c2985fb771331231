"""MoE routing: GLM noaux_tc router and token sort/align by expert. Every worker rank (MoE layers).

moe_route (spec §1.2): logits = h_f32 . W_gate_f32^T (fp32 out of cuBLAS, see router_logits; FUSED_GEMM: a
tensor-core dot in the routing kernel itself, measured slower); then per token (BLOCK_T tokens a program):
  s = sigmoid(logits); c = s + correction_bias (selection only); group score = sum of the top-2 c of
  each group, keep topk_group groups (n_group = 1 for every GLM-4.x: a no-op); pick top_k experts of c
  (highest first, lowest id on ties); w = s[picked]; w /= sum(w) + 1e-20 if norm_topk_prob; w *= scaling.
  shared_slot=True appends slot k: id E (the shared expert stacked after the routed ones), weight 1.0.
moe_align: sorts the T*k (token, slot) pairs by expert and pads each expert's run to a multiple of
BLOCK_M so one GEMM tile never mixes experts; pure torch on the device, no host sync (sizes are bounds).
The torch reference it is tested against is shared/model/ops.py::moe_route_ref (the CPU model's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmserve.kernels._common import INTERPRET, check, dot_in, new_out, next_pow2, pdl_enter, pdl_kw


@triton.jit
def _select(logit, rt, row_ok, bias_ptr, w_ptr, ids_ptr, E, scaling,
            TOP_K: tl.constexpr, SHARED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
            NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K_PAD: tl.constexpr):
    """The router's selection for the BLOCK_T tokens rt of fp32 logits [BLOCK_T, BLOCK_E]: stores weights / ids
    and returns them, (w [BLOCK_T, K_PAD] fp32, ids [BLOCK_T, K_PAD] int64), 0 in slots >= TOP_K + SHARED."""
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    s = 1.0 / (1.0 + tl.exp(-logit))  # [BLOCK_T, BLOCK_E]
    c = tl.where(ok[None, :], s + tl.load(bias_ptr + e, mask=ok, other=0.0)[None, :], float("-inf"))
    ee = e[None, :] + tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)  # expert id of each element
    if N_GROUP > 1:
        group = ee // (E // N_GROUP)
        keep = ee < 0
        gscore = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # group score broadcast to its experts
        for g in range(N_GROUP):
            cg = tl.where(group == g, c, float("-inf"))
            top1 = tl.max(cg, axis=1)
            first = tl.min(tl.where(cg == top1[:, None], ee, BLOCK_E), axis=1)
            top2 = tl.max(tl.where(ee == first[:, None], float("-inf"), cg), axis=1)
            gscore = tl.where(group == g, (top1 + top2)[:, None], gscore)
        for _ in range(TOPK_GROUP):
            best = tl.max(tl.where(keep | (ee >= E), float("-inf"), gscore), axis=1)
            gbest = tl.min(tl.where((gscore == best[:, None]) & ~keep & (ee < E), group, N_GROUP), axis=1)
            keep = keep | (group == gbest[:, None])
        c = tl.where(keep, c, float("-inf"))
    slots = tl.arange(0, K_PAD)[None, :] + tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    w_out = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    id_out = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    for j in range(TOP_K):
        best = tl.max(c, axis=1)
        pick = tl.min(tl.where(c == best[:, None], ee, BLOCK_E), axis=1)  # lowest id among ties
        w = tl.sum(tl.where(ee == pick[:, None], s, 0.0), axis=1)  # unbiased score of the pick
        w_out = tl.where(slots == j, w[:, None], w_out)
        id_out = tl.where(slots == j, pick[:, None].to(tl.int64), id_out)
        c = tl.where(ee == pick[:, None], float("-inf"), c)
    if NORM:
        w_out = w_out / (tl.sum(w_out, axis=1)[:, None] + 1e-20)
    w_out = w_out * scaling
    if SHARED:  # the shared expert's slot: id E, weight 1 (not normalised, not scaled)
        w_out = tl.where(slots == TOP_K, 1.0, w_out)
        id_out = tl.where(slots == TOP_K, E, id_out)
    out_k = TOP_K + SHARED
    out = rt[:, None].to(tl.int64) * out_k + slots
    mask = row_ok[:, None] & (slots < out_k)
    tl.store(w_ptr + out, w_out, mask=mask)
    tl.store(ids_ptr + out, id_out, mask=mask)
    return w_out, id_out


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, scaling,
    TOP_K: tl.constexpr, SHARED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr = False,
):
    """BLOCK_T tokens a program; logits [T, E] fp32."""
    pdl_enter(PDL)
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    row_ok = rt < T
    logit = tl.load(logits_ptr + rt[:, None].to(tl.int64) * E + e[None, :], mask=row_ok[:, None] & (e < E)[None, :],
                    other=0.0)
    _select(logit, rt, row_ok, bias_ptr, w_ptr, ids_ptr, E, scaling, TOP_K, SHARED, N_GROUP, TOPK_GROUP, NORM,
            BLOCK_T, BLOCK_E, K_PAD)


@triton.jit
def _gemm_route_kernel(
    x_ptr, gate_ptr, bias_ptr, w_ptr, ids_ptr, T, E, H, x_st, scaling,
    TOP_K: tl.constexpr, SHARED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr = False,
):
    """The router logits and the selection in one launch, BLOCK_T tokens a program: logits [BLOCK_T, BLOCK_E]
    = x [BLOCK_T, H] . gate [E, H]^T, bf16 operands on the tensor cores with fp32 accumulation (the products
    are exact in fp32: router_logits' values up to summation order), kept in registers for _select."""
    pdl_enter(PDL)
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rt < T
    acc = logits_tile(x_ptr, gate_ptr, rt, row_ok, x_st, E, H, 0, tl.cdiv(H, BLOCK_K), BLOCK_T, BLOCK_E, BLOCK_K,
                      UPCAST)
    _select(acc, rt, row_ok, bias_ptr, w_ptr, ids_ptr, E, scaling, TOP_K, SHARED, N_GROUP, TOPK_GROUP, NORM,
            BLOCK_T, BLOCK_E, K_PAD)


@triton.jit
def logits_tile(x_ptr, gate_ptr, rt, row_ok, x_st, E, H, kb_lo, kb_hi, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, res_ptr=None, nw_ptr=None, rstd=None,
                NORM_IN: tl.constexpr = False):
    """Router logits of the token rows rt over K blocks [kb_lo, kb_hi): x [rt, K] . gate[:, K]^T -> [BLOCK_T,
    BLOCK_E] fp32, bf16 tensor-core dots with fp32 accumulation (shared with kernels/moe_route_align.py).
    NORM_IN: the rows are RMSNorm(x + res) (res [T, H] rows x_st apart, norm weight nw [H], rstd [BLOCK_T] each
    row's 1 / rms of x + res), formed per K block with rmsnorm's roundings (the sum, x * rstd, the weight)."""
    e = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    row_offs = rt[:, None].to(tl.int64) * x_st + kb_lo * BLOCK_K + rk[None, :]  # [BLOCK_T, BLOCK_K] of x (and res)
    g_p = gate_ptr + e[None, :] * H + kb_lo * BLOCK_K + rk[:, None]  # [BLOCK_K, BLOCK_E] = gate^T
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k_ok = rk < H - kb * BLOCK_K
        x = tl.load(x_ptr + row_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM_IN:
            dt = x.dtype
            r = tl.load(res_ptr + row_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            xs = (x.to(tl.float32) + r.to(tl.float32)).to(dt).to(tl.float32)
            w = tl.load(nw_ptr + kb * BLOCK_K + rk, mask=k_ok, other=0.0).to(tl.float32)
            x = ((xs * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]).to(dt)
        g = tl.load(g_p, mask=k_ok[:, None] & (e < E)[None, :], other=0.0)
        acc = tl.dot(dot_in(x, UPCAST), dot_in(g, UPCAST), acc)
        row_offs += BLOCK_K
        g_p += BLOCK_K
    return acc


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """x [T, H], gate [E, H] -> fp32 logits [T, E]. A bf16 gate (the checkpoint's dtype; Router.after_load keeps
    it bf16 when that is exact) with bf16 x on CUDA: one tensor-core GEMM with fp32 output -- bf16 x bf16
    products are exact in fp32 and accumulate in fp32, so this is the fp32 router up to summation order,
    without the fp32 copy of x (H100 B 256: 5.8 us copy + 6.5 us SIMT sgemm a layer before)."""
    if x.is_cuda and x.dtype == gate_weight.dtype == torch.bfloat16:
        return torch.mm(x, gate_weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), gate_weight.float())


# The router GEMM inside the routing kernel (bf16 x and gate only), off: measured slower. BLOCK_T = 16 tokens a
# program (tl.dot's floor), so batch 1 is one program reading the whole gate (64 x 2048 bf16, 256 KB) on one SM,
# a latency-bound chain: H100 run 29 (bench/gpu_suite.sh h100k), GLM-4.7-Flash FP8 step, 11.4 us a layer at B 1
# and 10.9 at B 256 against cuBLAS 5.2 + routing 1.9; graph step 4.33 / 19.47 ms fused, 4.12 / 19.33 cuBLAS.
# True: bench/profile_step.py --router_gemm fused.
FUSED_GEMM = False
GEMM_ROUTE_WARPS = 4


def moe_route(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
              shared_slot=False):
    """shared.model.ops signature -> (weights [T, k'] fp32, ids [T, k'] int64), ids highest score first;
    k' = k + 1 with the shared slot last when shared_slot. The fp32 logits by router_logits, then _route_kernel;
    with FUSED_GEMM and bf16 x and gate (Router.after_load keeps an exactly bf16 gate) one launch instead,
    _gemm_route_kernel.
    (An in-kernel fp32 SIMT GEMM, one token a program, was measured on an H100, run 15: 150 us a layer at
    B 256 and a 12.4 ms B 1 step against 6.3; removed.)"""
    num_experts, h = gate_weight.shape
    check(hidden.shape[-1] == h, "hidden size must match the gate")
    check(correction_bias.shape == (num_experts,), "correction bias must be [E]")
    check(num_experts % n_group == 0 and topk_group <= n_group, "bad grouping")
    x = hidden.reshape(-1, h)
    t = x.shape[0]
    out_k = top_k + int(shared_slot)
    weights = new_out((t, out_k), torch.float32, hidden.device)
    ids = new_out((t, out_k), torch.int64, hidden.device)
    if not t:
        return weights, ids
    bias = correction_bias.float().contiguous()
    meta = dict(TOP_K=top_k, SHARED=int(shared_slot), K_PAD=next_pow2(out_k), N_GROUP=n_group, TOPK_GROUP=topk_group,
                NORM=bool(norm_topk_prob), BLOCK_E=next_pow2(num_experts), **pdl_kw(hidden.device, t))
    if FUSED_GEMM and x.dtype == gate_weight.dtype == torch.bfloat16 and x.stride(1) == 1:
        gate = gate_weight.contiguous()
        block_k = 128 if num_experts <= 64 else 64 if num_experts <= 128 else 32  # gate tile <= 16 KB a stage
        _gemm_route_kernel[(triton.cdiv(t, 16),)](
            x, gate, bias, weights, ids, t, num_experts, h, x.stride(0), float(scaling),
            BLOCK_T=16, BLOCK_K=block_k, UPCAST=INTERPRET, num_warps=GEMM_ROUTE_WARPS, num_stages=3, **meta)
        return weights, ids
    logits = router_logits(x, gate_weight).contiguous()  # [T, E] fp32
    _route_kernel[(t,)](logits, bias, weights, ids, t, num_experts, float(scaling), BLOCK_T=1,
                        num_warps=1 if num_experts <= 64 else 2, **meta)
    return weights, ids


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs [P] int32, block_expert [P // block_m] int32), P = T*k + E*(block_m-1)
    rounded up to block_m (a bound, so no host sync).

    sorted_pairs lists flat pair indices (t * k + j) grouped by expert, each expert's run padded to a
    multiple of block_m with the sentinel T*k; block_expert[b] is the expert of rows b*block_m.. or -1
    for blocks past the last used one.
    """
    flat = ids.reshape(-1).long()
    num_pairs = flat.numel()
    cap = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    # scatter_add, not bincount: bincount reads max() on the host (a sync that breaks CUDA graphs)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    run_start = torch.cumsum(padded, 0) - padded  # [E] first padded row of each expert
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=ids.device) - first_of_expert[sorted_experts]
    sorted_pairs = torch.full((cap,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[run_start[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, cap, block_m, device=ids.device)
    ends = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert
