"""--load-format dummy: random weights at a real-shaped config route realistically (256 random tokens touch
>= 90% of the experts in every MoE layer, MTP layer included) and give finite logits."""

import pytest
import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.tiny import write_tiny_checkpoint

FLASH_SHAPED = dict(arch="glm4_moe_lite", n_routed_experts=64, num_experts_per_tok=4, n_group=1, topk_group=1,
                    routed_scaling_factor=1.8, num_hidden_layers=4, vocab_size=1024, moe_intermediate_size=16)
GLM47_SHAPED = dict(arch="glm4_moe", n_routed_experts=160, num_experts_per_tok=8, n_group=1, topk_group=1,
                    routed_scaling_factor=2.5, num_hidden_layers=4, first_k_dense_replace=3, vocab_size=1024,
                    moe_intermediate_size=8)


@pytest.mark.parametrize("shape", [FLASH_SHAPED, GLM47_SHAPED], ids=["flash", "glm47"])
def test_dummy_weights_route_over_most_experts(tmp_path, shape):
    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), **shape)
    runner = ModelRunner(model_dir, load_format="dummy", seed=1)
    runner.track_expert_usage()
    ids = torch.randint(0, shape["vocab_size"], (256,), generator=torch.Generator().manual_seed(0)).tolist()
    kv = PagedKVCache(runner.kv_layout(16), 20)
    batch = ForwardBatch.build(ForwardMode.PREFILL, [(ids, 0, list(range(1, 17)))], 16, logits_rows="all")
    out = runner.forward(batch, kv)
    assert torch.isfinite(out.logits).all()
    draft = runner.mtp_forward(batch, batch.input_ids, out.hidden, kv)
    assert torch.isfinite(draft.logits).all()
    usage = runner.expert_usage()
    assert sorted(usage) == [i for i in range(shape["num_hidden_layers"] + 1) if runner.config.is_moe_layer(i)]
    for layer, counts in usage.items():
        assert int(counts.sum()) == 256 * shape["num_experts_per_tok"]
        touched = int((counts > 0).sum())
        assert touched >= 0.9 * shape["n_routed_experts"], (layer, touched)
