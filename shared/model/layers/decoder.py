"""One GLM decoder layer: RMSNorm -> attention -> RMSNorm -> dense MLP or MoE (each worker rank).

The residual stream is carried beside the hidden state so the norms can fuse the add (vLLM style):
forward(x, residual) returns (mlp_out, residual) and the caller's next norm adds them.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.mlp import GatedMLP
from glmserve.shared.model.layers.moe import MoE
from glmserve.shared.model.layers.norm import Prenormed, RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, attn: nn.Module, ctx: BuildCtx):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.layer_id = layer_id  # also the KV cache layer this layer writes
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        if cfg.is_moe_layer(layer_id):
            self.mlp = MoE(cfg, ctx, f"{prefix}.mlp")
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx, f"{prefix}.mlp")
        # (the next layer's input norm, whether its consumer takes the FP8 form): set by the model for every main
        # layer but the last, so a MoE layer may hand the next one its input already normed (Prenormed)
        self.next_norm: tuple[RMSNorm, bool] | None = None

    def forward(self, x, residual: torch.Tensor | None, cos_sin, batch, kv_cache):
        """x, residual: [T, H] (residual None on the first layer; x may be the MoE's slot form [T, k', H],
        which only add_rms_norm takes, or Prenormed: this layer's input norm already done) -> (out, residual).
        Each norm also hands its consumer the per-token FP8 form of its output when that consumer's first GEMM is
        FP8."""
        if isinstance(x, Prenormed):  # the previous layer ran this layer's input norm (x + residual: residual)
            h, h_fp8 = x
        elif residual is None:
            h, _, h_fp8 = self.input_layernorm.apply(x, None, self.self_attn.input_fp8)
            residual = x
        else:
            h, residual, h_fp8 = self.input_layernorm.apply(x, residual, self.self_attn.input_fp8)
        h = self.self_attn(h, cos_sin, batch, kv_cache, self.layer_id, x_fp8=h_fp8)
        if isinstance(self.mlp, MoE):  # the post-attention norm in the router's op, the next layer's input norm in
            # the experts' op (one launch each at small batches)
            return self.mlp.forward_normed(h, residual, self.post_attention_layernorm, self.next_norm)
        h, residual, h_fp8 = self.post_attention_layernorm.apply(h, residual, self.mlp.input_fp8)
        return self.mlp(h, x_fp8=h_fp8), residual
