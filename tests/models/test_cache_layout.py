"""The paged cache holds exactly what transformers caches (the KV-link contract of shared/kvcache/cache.py):
glm4_moe K after QK-norm + RoPE and V per kv head; glm4_moe_lite [normed latent | roped k_pe], one head."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner

PROMPT = [5, 6, 7, 8, 9, 10]
PAGES = [3, 1]  # scattered on purpose
PAGE = 4


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_cache_entries_equal_transformers_cache(tiny_dirs, arch):
    runner = ModelRunner(tiny_dirs[arch], with_mtp=False)
    kv = PagedKVCache(runner.kv_layout(PAGE), 5)
    batch = ForwardBatch.build(ForwardMode.PREFILL, [(PROMPT, 0, PAGES)], PAGE)
    runner.forward(batch, kv)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        cache = hf(torch.tensor([PROMPT]), use_cache=True).past_key_values
    for layer in range(runner.config.num_hidden_layers):
        ours = kv.flat_layer(layer)[:, batch.slot_mapping]  # [parts, T, heads, dim]
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [heads, T, dim]
        if arch == "glm4_moe":
            want = torch.stack([keys.transpose(0, 1), values.transpose(0, 1)])
        else:  # HF caches (normed latent, roped k_pe) as (keys, values), one head each
            want = torch.cat([keys, values], dim=-1).transpose(0, 1)[None]
        assert ours.shape == want.shape
        assert torch.allclose(ours, want, atol=1e-5, rtol=1e-5), layer
