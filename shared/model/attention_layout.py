"""KV cache layout each architecture needs on one TP rank (both worker kinds; see shared/kvcache/cache.py)."""

from __future__ import annotations

import torch

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.kvcache.cache import KVLayout
from glmserve.shared.model.layers.attention import local_kv_heads


def kv_layout_for(cfg: ModelConfig, tp_size: int, page_size: int, dtype: torch.dtype, num_layers: int) -> KVLayout:
    """glm4_moe: parts (k, v), local kv heads, head_dim. lite: one part, one head, latent + rope key."""
    if cfg.is_mla:
        return KVLayout(num_layers, 1, page_size, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype)
    return KVLayout(num_layers, 2, page_size, local_kv_heads(cfg.num_key_value_heads, tp_size), cfg.head_dim, dtype)
