"""MoE routing: GLM noaux_tc router and token sort/align by expert. Every worker rank (MoE layers).

moe_route (spec §1.2): logits = h_f32 . W_gate_f32^T (fp32, cuBLAS; in the kernel only when
GEMM_MAX_TOKENS allows, an A/B variant); then per token (BLOCK_T tokens a Triton program):
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

from glmserve.kernels._common import check, new_out, next_pow2


@triton.jit
def _route_kernel(
    x_ptr, gate_ptr, logits_ptr, bias_ptr, w_ptr, ids_ptr, T, H, E, x_stride, scaling,
    TOP_K: tl.constexpr, SHARED: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    GEMM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
):
    """BLOCK_T tokens a program. GEMM: logits [BLOCK_T, E] = x . gate^T here, fp32 inputs and accumulation
    (x [T, H] any float dtype, upcast exactly; gate [E, H] fp32); else read from logits [T, E] fp32."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    row_ok = rt < T
    ok = e < E
    if GEMM:
        logit = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rt[:, None].to(tl.int64) * x_stride + kk[None, :],
                         mask=row_ok[:, None] & (kk[None, :] < H), other=0.0).to(tl.float32)
            gk = tl.load(gate_ptr + e[:, None] * H + kk[None, :], mask=ok[:, None] & (kk[None, :] < H), other=0.0)
            logit += tl.dot(xk, tl.trans(gk), input_precision="ieee")
    else:
        logit = tl.load(logits_ptr + rt[:, None].to(tl.int64) * E + e[None, :],
                        mask=row_ok[:, None] & ok[None, :], other=0.0)
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


GEMM_MAX_GATE_BYTES = 1 << 20  # fp32 gate weights up to 1 MiB (GLM-4.7-Flash: 64 x 2048 x 4 = 512 KiB) in-kernel
# In-kernel logits are OFF by default (0): measured on an H100 (run 15) the fused GEMM took 150 us a layer at
# B 256 (16 programs, each a serial 32-step fp32 K loop; cuBLAS + the routing kernel: ~10 us) and made B 1
# 12.4 ms a step. Kept only for the A/B (`bench/profile_step.py --router_gemm kernel` sets 512).
GEMM_MAX_TOKENS = 0
GEMM_BLOCK_T = 16  # tokens a program (tl.dot's minimum M)


def moe_route(hidden, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling,
              shared_slot=False):
    """shared.model.ops signature -> (weights [T, k'] fp32, ids [T, k'] int64), ids highest score first;
    k' = k + 1 with the shared slot last when shared_slot.

    One launch when the fp32 gate is small and the batch decode-sized (the logits computed in the kernel:
    no fp32 copy of hidden, no cuBLAS GEMM); else cuBLAS fp32 logits, then the kernel."""
    num_experts, h = gate_weight.shape
    check(hidden.shape[-1] == h, "hidden size must match the gate")
    check(correction_bias.shape == (num_experts,), "correction bias must be [E]")
    check(num_experts % n_group == 0 and topk_group <= n_group, "bad grouping")
    x = hidden.reshape(-1, h)
    t = x.shape[0]
    gate = gate_weight.float().contiguous()
    gemm = (t <= GEMM_MAX_TOKENS and gate.numel() * 4 <= GEMM_MAX_GATE_BYTES and x.stride(-1) == 1
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))
    logits = gate if gemm else F.linear(x.float(), gate).contiguous()  # [T, E] fp32 (placeholder when gemm)
    out_k = top_k + int(shared_slot)
    weights = new_out((t, out_k), torch.float32, hidden.device)
    ids = new_out((t, out_k), torch.int64, hidden.device)
    if t:
        block_t = GEMM_BLOCK_T if gemm else 1
        block_e = max(16, next_pow2(num_experts)) if gemm else next_pow2(num_experts)  # tl.dot: N >= 16
        _route_kernel[(triton.cdiv(t, block_t),)](
            x, gate, logits, correction_bias.float().contiguous(), weights, ids, t, h, num_experts,
            x.stride(0), float(scaling),
            TOP_K=top_k, SHARED=int(shared_slot), K_PAD=next_pow2(out_k), N_GROUP=n_group, TOPK_GROUP=topk_group,
            NORM=bool(norm_topk_prob), GEMM=gemm, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=64,
            num_warps=8 if gemm else (1 if num_experts <= 64 else 2),  # 8: no spills at BLOCK_K 64 (aot_check)
        )
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
