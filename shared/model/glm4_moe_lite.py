"""glm4_moe_lite (GLM-4.7-Flash): MLA attention, interleaved RoPE on the rope dims (each worker rank)."""

from __future__ import annotations

from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.base import GlmMoeCausalLM
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.mla import MLAAttention
from glmserve.shared.model.layers.rope import RotaryEmbedding


class Glm4MoeLiteForCausalLM(GlmMoeCausalLM):
    def make_rope(self, cfg: ModelConfig, ctx: BuildCtx) -> RotaryEmbedding:
        dim = int(cfg.qk_rope_head_dim * cfg.partial_rotary_factor)
        return RotaryEmbedding(dim, cfg.rope_theta, interleaved=cfg.rope_interleave, device=ctx.device)

    def make_attention(self, cfg: ModelConfig, ctx: BuildCtx, layer_id: int) -> nn.Module:
        return MLAAttention(cfg, self.rope, ctx, f"model.layers.{layer_id}.self_attn")
