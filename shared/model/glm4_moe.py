"""glm4_moe (GLM-4.5 / 4.5-Air / 4.6 / 4.7): GQA attention with partial NeoX RoPE (each worker rank)."""

from __future__ import annotations

from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.base import GlmMoeCausalLM
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.attention import GQAAttention
from glmserve.shared.model.layers.rope import RotaryEmbedding


class Glm4MoeForCausalLM(GlmMoeCausalLM):
    def make_rope(self, cfg: ModelConfig, ctx: BuildCtx) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, interleaved=False, device=ctx.device)

    def make_attention(self, cfg: ModelConfig, ctx: BuildCtx, layer_id: int) -> nn.Module:
        return GQAAttention(cfg, self.rope, ctx, f"model.layers.{layer_id}.self_attn")
