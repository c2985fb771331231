"""Shared skeleton of the GLM causal LMs over a flat batch and a paged KV cache (each worker rank).

Module names mirror the checkpoint (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`,
MTP at `model.layers.{num_hidden_layers}`), so weights load by their own names. An architecture file
only says which attention and RoPE it uses (`make_attention`, `make_rope`).
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.decoder import DecoderLayer
from glmserve.shared.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from glmserve.shared.model.layers.norm import RMSNorm
from glmserve.shared.model.layers.rope import RotaryEmbedding
from glmserve.shared.model.mtp import MtpLayer
from glmserve.shared.runner.batch import ForwardBatch


class GlmMoeCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: BuildCtx, with_mtp: bool = False):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.rope = self.make_rope(cfg, ctx)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.tp, ctx.dtype, ctx.device)
        layers: list[nn.Module] = [
            DecoderLayer(cfg, i, self.make_attention(cfg, ctx, i), ctx) for i in range(cfg.num_hidden_layers)
        ]
        self.num_mtp_layers = min(1, cfg.num_nextn_predict_layers) if with_mtp else 0
        for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + self.num_mtp_layers):
            layers.append(MtpLayer(cfg, i, self.make_attention(cfg, ctx, i), ctx))
        self.model.layers = nn.ModuleList(layers)
        for layer, nxt in zip(layers[: cfg.num_hidden_layers - 1], layers[1 : cfg.num_hidden_layers]):
            layer.next_norm = (nxt.input_layernorm, nxt.self_attn.input_fp8)  # a MoE layer may run it (Prenormed)
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx.tp, ctx.dtype, ctx.device)

    def make_rope(self, cfg: ModelConfig, ctx: BuildCtx) -> RotaryEmbedding:
        raise NotImplementedError

    def make_attention(self, cfg: ModelConfig, ctx: BuildCtx, layer_id: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        """Run the main layers over the batch tokens -> hidden [T, H] after the final norm."""
        cos_sin = self.rope.cos_sin(batch.positions)
        x, residual = self.model.embed_tokens(batch.input_ids), None
        for layer in self.model.layers[: self.cfg.num_hidden_layers]:
            x, residual = layer(x, residual, cos_sin, batch, kv_cache)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, H] -> full-vocab logits [R, V] fp32."""
        return self.lm_head(hidden)

    def mtp_head_norm(self, z: torch.Tensor) -> torch.Tensor:
        """z [T, H] (an MTP block output) -> shared_head.norm(z): the state SGLang's EAGLE chains on."""
        return self.model.layers[self.cfg.num_hidden_layers].shared_head.norm(z)

    def mtp_forward(self, batch: ForwardBatch, input_ids: torch.Tensor, prev_hidden: torch.Tensor, kv_cache):
        """MTP draft over the batch rows (positions/slots from batch, tokens `input_ids` [T]).

        prev_hidden [T, H]: the target's post-norm hidden at the same rows. Returns (logits [R, V] fp32 at
        batch.logits_indices, hidden [T, H] = MTP block output before shared_head.norm, for chaining).
        """
        if self.num_mtp_layers == 0:
            raise RuntimeError("model built without the MTP layer (with_mtp=False or no MTP in the config)")
        mtp: MtpLayer = self.model.layers[self.cfg.num_hidden_layers]
        cos_sin = self.rope.cos_sin(batch.positions)
        embeds = self.model.embed_tokens(input_ids)
        normed, z = mtp.draft(embeds, prev_hidden.to(embeds.dtype), cos_sin, batch, kv_cache)
        return self.compute_logits(normed[batch.logits_indices]), z
