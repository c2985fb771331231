"""GQA attention over the paged KV cache (glm4_moe; each worker rank).

merged q/k/v projection (+bias) -> optional per-head QK RMSNorm -> partial NeoX RoPE -> write k, v to the cache
slots of the batch -> causal attention over each sequence's cached tokens -> o_proj (row-parallel, all-reduce).
TP: q heads split; kv heads split when tp_size <= num_kv_heads, else each rank holds the one kv head its
q heads use (replicated). Cache part 0 holds K (after norm + RoPE), part 1 holds V.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model import ops
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.norm import RMSNorm
from glmserve.shared.model.layers.rope import RotaryEmbedding
from glmserve.shared.model.parallel import TPGroup
from glmserve.shared.runner.batch import ForwardBatch


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    return max(1, num_kv_heads // tp_size)


def kv_head_shard(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first kv head, count) this rank holds."""
    if tp.tp_size <= num_kv_heads:
        if num_kv_heads % tp.tp_size:
            raise ValueError(f"num_key_value_heads {num_kv_heads} not divisible by tp {tp.tp_size}")
        n = num_kv_heads // tp.tp_size
        return tp.tp_rank * n, n
    if tp.tp_size % num_kv_heads:
        raise ValueError(f"tp {tp.tp_size} not a multiple of num_key_value_heads {num_kv_heads}")
    return tp.tp_rank // (tp.tp_size // num_kv_heads), 1


class GQAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, ctx: BuildCtx, prefix: str):
        super().__init__()
        h, d, tp = cfg.hidden_size, cfg.head_dim, ctx.tp
        self.head_dim, self.rope = d, rope
        self.num_heads = cfg.num_attention_heads // tp.tp_size
        kv0, self.num_kv = kv_head_shard(cfg.num_key_value_heads, tp)
        self.scale = d ** -0.5
        bias, kv_full, kv_shard = cfg.attention_bias, cfg.num_key_value_heads * d, (kv0 * d, self.num_kv * d)
        q_full = cfg.num_attention_heads * d
        self.qkv_proj = ctx.merged(prefix, ("q_proj", "k_proj", "v_proj"), h, [q_full, kv_full, kv_full], bias,
                                   "column", [tp.shard(q_full), kv_shard, kv_shard])
        self.o_proj = ctx.linear(f"{prefix}.o_proj", cfg.num_attention_heads * d, h, False, "row")
        self.input_fp8 = self.qkv_proj.fp8  # forward may be handed x's per-token FP8 form (a fused norm)
        self.q_norm = self.k_norm = None
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, ctx.dtype, ctx.device)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, ctx.dtype, ctx.device)

    def forward(self, x: torch.Tensor, cos_sin, batch: ForwardBatch, kv_cache, cache_layer: int,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H] (x_fp8: its per-token FP8 form, from a fused norm) -> [T, H]; writes this layer's K/V of
        the batch tokens into cache layer `cache_layer`."""
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x, x_fp8))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv, self.head_dim)
        v = v.reshape(t, self.num_kv, self.head_dim)
        cache = kv_cache.flat_layer(cache_layer)  # [2, num_slots, num_kv, head_dim]
        norm = self.q_norm is not None
        # one op: q/k norms (use_qk_norm), RoPE of both, K and V written at the batch tokens' slots
        q = ops.gqa_kv_write(q, k, v, self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                             self.q_norm.eps if norm else 0.0, *cos_sin, self.rope.rotary_dim, self.rope.interleaved,
                             cache[0], cache[1], batch.slot_mapping)
        o = ops.paged_attention(q, cache[0], cache[1], batch, kv_cache.layout.page_size, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim).to(x.dtype))
