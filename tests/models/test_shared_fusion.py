"""MoE shared-expert fusion (shared/model/layers/moe.py): the shared expert loaded into the stacked experts'
last slot gives the same logits as running it as its own MLP, for both archs, float and --quantization fp8."""

import pytest
import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.model.layers.moe import MoE
from glmserve.shared.runner.batch import ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.tiny import write_tiny_checkpoint
from tests.models.helpers import Pages, step


def prefill_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    kv = PagedKVCache(runner.kv_layout(4), num_pages=16)
    return step(runner.forward, Pages(16, 4), [(0, prompt, 0)], ForwardMode.PREFILL, kv).logits


@pytest.mark.parametrize("arch,quant", [("glm4_moe", None), ("glm4_moe_lite", None), ("glm4_moe", "fp8")])
def test_fused_shared_expert_same_logits(tmp_path, arch, quant):
    path = write_tiny_checkpoint(str(tmp_path / arch), arch, seed=7)
    fused = ModelRunner(path, quantization=quant)
    plain = ModelRunner(path, quantization=quant, fuse_shared_experts=False)
    moes = [m for m in fused.model.modules() if isinstance(m, MoE)]
    e = fused.config.n_routed_experts
    assert moes and all(m.shared_experts is None and m.num_slots == e + 1 for m in moes)
    assert all(m.shared_experts is not None and m.num_slots == e for m in plain.model.modules() if isinstance(m, MoE))
    # the shared expert's weights sit in slot E
    ref = next(m for m in plain.model.modules() if isinstance(m, MoE))
    torch.testing.assert_close(moes[0].experts.w13[e].float(), ref.shared_experts.gate_up_proj.weight.float())
    prompt = [3, 17, 5, 9, 30, 2, 11]
    a, b = prefill_logits(fused, prompt), prefill_logits(plain, prompt)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
