"""The MTP (next-n predict) layer `model.layers.{L}` of a GLM checkpoint (decode workers; spec §3.2).

  z = eh_proj([enorm(embed(x_{p+1})) | hnorm(h_p)])   # h_p: target hidden after the final norm
  z = DecoderLayer_L(z)                                # always MoE; own KV in cache layer L
  logits = lm_head(shared_head.norm(z))                # embed and lm_head shared with the target
Row p of the draft batch carries h_p and token x_{p+1} at RoPE position p (vLLM/SGLang positions).
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.decoder import DecoderLayer
from glmserve.shared.model.layers.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: BuildCtx):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)


class MtpLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer_id: int, attn: nn.Module, ctx: BuildCtx):
        super().__init__(cfg, layer_id, attn, ctx)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.eh_proj = ctx.linear(f"model.layers.{layer_id}.eh_proj", 2 * h, h)
        self.shared_head = SharedHead(cfg, ctx)

    def draft(self, embeds: torch.Tensor, prev_hidden: torch.Tensor, cos_sin, batch, kv_cache):
        """embeds, prev_hidden: [T, H] -> (normed [T, H] for the lm_head, pre-norm block output [T, H])."""
        z = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))
        out, residual = self.forward(z, None, cos_sin, batch, kv_cache)  # out: [T, H] or the MoE's slot form
        return self.shared_head.norm(out, residual)  # (norm(out + residual), out + residual)
