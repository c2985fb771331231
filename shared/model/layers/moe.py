"""GLM MoE block: sigmoid noaux_tc router + routed experts + ungated shared expert (each worker rank).

TP: the router (`gate.weight` [E, H], fp32 values, held bf16 when exact, fp32 `gate.e_score_correction_bias` [E]) is replicated;
every expert's intermediate dim is split across ranks (w13 rows, w2 columns), the shared expert likewise;
routed + shared partial sums are added and all-reduced once here.
Checkpoint names `experts.{e}.{gate,up,down}_proj.weight[_scale]` load into the stacked
`experts.w13` [S, 2*I_local, H] ([gate; up]) and `experts.w2` [S, H, I_local] via `load_expert`.

Shared-expert fusion (default; BuildCtx.fuse_shared_experts): with one shared expert of the routed experts'
width and the same FP8-ness, `shared_experts.*` load into slot E of the stacked experts (S = E + 1) and the
router adds a last slot (id E, weight 1.0) to every token, so one fused-MoE call computes routed + shared:
no separate quantize / two GEMMs / silu / add for the shared expert (6 launches a layer at FP8 decode).
Otherwise S = E and the shared expert is its own GatedMLP.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model import ops
from glmserve.shared.model.layers.linear import copy_checked, quantize_per_channel, set_loader
from glmserve.shared.model.layers.mlp import GatedMLP
from glmserve.shared.model.layers.norm import Prenormed
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.parallel import TPGroup
from glmserve.shared.weights.lazy import materialize


# TP 1 + fused shared expert: MoE returns the slot form and the next add_rms_norm sums it (False: the
# experts sum their slots themselves; bench/profile_step.py --separate_slot_sum A/B)
SLOT_SUM_IN_NORM = True


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, device="cpu"):
        super().__init__()
        e, h = cfg.n_routed_experts, cfg.hidden_size
        self.cfg = cfg
        self.weight = set_loader(nn.Parameter(torch.empty(e, h, device=device), requires_grad=False),
                                 lambda p, t: copy_checked(p, t))
        self.e_score_correction_bias = set_loader(
            nn.Parameter(torch.zeros(e, device=device), requires_grad=False), lambda p, t: copy_checked(p, t))

    def after_load(self) -> None:
        """Keep the gate bf16 when that is exact (GLM checkpoints store it bf16): the fp32 router's values
        unchanged, and the kernel's logits one bf16-in fp32-out GEMM (kernels.moe_route.router_logits)."""
        w = self.weight
        if w.dtype == torch.float32 and torch.equal(w.to(torch.bfloat16).float(), w):
            self.weight = nn.Parameter(w.to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor, shared_slot: bool = False, num_slots: int = 0, fp8: bool = False):
        """x [T, H] -> (weights [T, k'] fp32, ids [T, k'], aligned); k' = k + 1 (last: id E, weight 1) with
        shared_slot; aligned: the pairs sorted for the experts' kernel (num_slots experts, FP8 or not) when the
        router's kernel sorted them too, else None (ops.moe_route_align)."""
        c = self.cfg
        return ops.moe_route_align(x, self.weight, self.e_score_correction_bias, c.num_experts_per_tok, c.n_group,
                                   c.topk_group, c.norm_topk_prob, c.routed_scaling_factor, shared_slot,
                                   num_slots or self.weight.shape[0] + int(shared_slot), fp8)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm, quant: bool, shared_slot: bool,
                       num_slots: int, fp8: bool):
        """The decoder's post-attention norm (RMSNorm `norm` of x + residual; quant: with its FP8 form), then
        forward on its output, as one op (ops.add_rms_norm_route_align: one launch at small batches) ->
        (y, s, y_fp8, weights, ids, aligned): y the normed rows, s = x + residual."""
        c = self.cfg
        return ops.add_rms_norm_route_align(x, residual, norm.weight, norm.eps, quant, self.weight,
                                            self.e_score_correction_bias, c.num_experts_per_tok, c.n_group,
                                            c.topk_group, c.norm_topk_prob, c.routed_scaling_factor, shared_slot,
                                            num_slots, fp8)


class Experts(nn.Module):
    """Stacked experts (the E routed ones, then the shared one at `shared_slot` when fused); this rank holds
    intermediate rows [r*I/tp, (r+1)*I/tp) of every expert."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, fp8: bool, dtype, device, fuse_shared: bool = False):
        super().__init__()
        h = cfg.hidden_size
        self.shared_slot = cfg.n_routed_experts if fuse_shared else None
        e = cfg.n_routed_experts + int(fuse_shared)  # slots S
        self.inter_start, self.inter_local = tp.shard(cfg.moe_intermediate_size)
        self.fp8 = fp8
        self.quantized_online = False  # set when float checkpoint tensors were quantized at load
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        i = self.inter_local
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=wdtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=wdtype, device=device), requires_grad=False)
        self.w13_scale = self.w2_scale = None
        if fp8:
            self.w13_scale = nn.Parameter(torch.ones(e, 2 * i, 1, device=device), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.ones(e, h, 1, device=device), requires_grad=False)

    def load_expert(self, expert: int, proj: str, kind: str, loaded: torch.Tensor) -> None:
        """proj: gate_proj|up_proj|down_proj; kind: weight|weight_scale. loaded: the full checkpoint tensor."""
        s, n = self.inter_start, self.inter_local
        if kind == "weight_scale":
            loaded = materialize(loaded)
        if proj == "down_proj":
            shard = loaded.narrow(1, s, n) if kind == "weight" else loaded.reshape(-1, 1)
            dst, dst_scale = self.w2.data[expert], (self.w2_scale.data[expert] if self.fp8 else None)
        else:
            shard = loaded.narrow(0, s, n) if kind == "weight" else loaded.reshape(-1, 1).narrow(0, s, n)
            off = 0 if proj == "gate_proj" else n
            dst = self.w13.data[expert, off : off + n]
            dst_scale = self.w13_scale.data[expert, off : off + n] if self.fp8 else None
        if kind == "weight_scale":
            copy_checked(dst_scale, shard.float(), f"experts.{expert}.{proj}.weight_scale")
        elif self.fp8 and loaded.dtype != torch.float8_e4m3fn:  # --quantization fp8 (online)
            q, scale = quantize_per_channel(materialize(shard))
            copy_checked(dst, q)
            dst_scale.copy_(scale)
            self.quantized_online = True
        else:
            copy_checked(dst, shard, f"experts.{expert}.{proj}.weight")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, keep_slots: bool = False,
                aligned=None) -> torch.Tensor:
        """-> [T, H], or the slot form [T, k', H] with keep_slots (see ops.fused_experts_ref); aligned: the
        router's sorted pairs (Router.forward)."""
        return ops.fused_experts(x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale,
                                 self.shared_slot is not None, x_fp8, keep_slots, aligned)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: BuildCtx, prefix: str):
        super().__init__()
        self.tp = ctx.tp
        self.expert_counts: torch.Tensor | None = None  # [S] tokens routed per expert slot, when tracking
        self.gate = Router(cfg, ctx.device)
        fp8 = ctx.fp8_modules(f"{prefix}.experts.0.gate_proj")
        fuse = (ctx.fuse_shared_experts and cfg.n_shared_experts == 1
                and fp8 == ctx.fp8_modules(f"{prefix}.shared_experts.gate_proj"))
        self.experts = Experts(cfg, ctx.tp, fp8, ctx.dtype, ctx.device, fuse_shared=fuse)
        self.num_slots = self.experts.w13.shape[0]
        self.input_fp8 = fp8  # callers may hand forward x's per-token FP8 form
        self.shared_experts = None if fuse else GatedMLP(
            cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx, f"{prefix}.shared_experts",
            reduce=False)

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H] (x_fp8: its per-token FP8 form, from a fused norm) -> routed + shared [T, H] (all-reduced).
        At TP 1 with the shared expert fused (nothing to add or all-reduce after the experts) the output is
        the slot form [T, k', H] instead: the experts' weighted per-slot rows, summed by the next layer's
        add_rms_norm (the decoder's consumer) in the same launch (one slot-sum kernel fewer a layer)."""
        weights, ids, aligned = self.gate(x, self.shared_experts is None, self.num_slots, self.experts.fp8)
        return self._experts(x, x_fp8, weights, ids, aligned)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm, next_norm=None):
        """forward(norm(x + residual)) with the norm in the router's op (Router.forward_normed) -> (forward's
        output, x + residual): the decoder's post-attention norm and this block, one launch fewer at decode.
        next_norm: (the next layer's input norm, FP8 form wanted): where the output is the slot form, that norm
        of it runs in the experts' op (ops.fused_experts_norm) -> (Prenormed(y, y_fp8), its x + residual)."""
        y, residual, y_fp8, weights, ids, aligned = self.gate.forward_normed(
            x, residual, norm, self.input_fp8, self.shared_experts is None, self.num_slots, self.experts.fp8)
        if next_norm is None or not self._slot_form():
            return self._experts(y, y_fp8, weights, ids, aligned), residual
        self._count(ids)
        nxt, quant = next_norm
        e = self.experts
        out, residual, out_fp8 = ops.fused_experts_norm(y, e.w13, e.w2, weights, ids, e.w13_scale, e.w2_scale,
                                                        e.shared_slot is not None, y_fp8, aligned, residual,
                                                        nxt.weight, nxt.eps, quant)
        return Prenormed(out, out_fp8), residual

    def _slot_form(self) -> bool:
        """TP 1 with the shared expert fused: nothing follows the experts, so the output is the slot form."""
        return SLOT_SUM_IN_NORM and self.shared_experts is None and self.tp.tp_size == 1

    def _count(self, ids: torch.Tensor) -> None:
        if self.expert_counts is not None:
            flat = ids.reshape(-1)  # scatter_add, not bincount: bincount reads max() on the host (a sync)
            self.expert_counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.expert_counts.dtype))

    def _experts(self, x, x_fp8, weights, ids, aligned) -> torch.Tensor:
        self._count(ids)
        if self._slot_form():
            return self.experts(x, weights, ids, x_fp8, keep_slots=True, aligned=aligned)
        out = self.experts(x, weights, ids, x_fp8, aligned=aligned)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, x_fp8)  # a bf16 layer ignores x_fp8
        return self.tp.all_reduce(out)
