"""shared.weights.constructed_mtp: the constructed checkpoint's target follows x -> f(x) and its MTP
layer predicts f of the token it is given (so every draft of the MTP tests' fleet is accepted)."""

from __future__ import annotations

import pytest
import torch

from glmserve.shared.generate import generate
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.constructed_mtp import chain, next_token_map, write_constructed_mtp_checkpoint


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_target_and_mtp_follow_the_permutation(tmp_path, arch):
    d = write_constructed_mtp_checkpoint(str(tmp_path / "m"), arch, seed=1)
    f = next_token_map(d)
    assert sorted(f) == list(range(len(f))) and f != list(range(len(f)))
    runner = ModelRunner(d)
    prompts = [[5, 9, 17], [40]]
    out = generate(runner, prompts, 6, ignore_eos=True, page_size=4)
    assert [o["token_ids"] for o in out] == [chain(p[-1], f, 6) for p in prompts]
    kv = PagedKVCache(runner.kv_layout(4), 8)
    ids = [5, 9, 17, 33, 200]
    batch = ForwardBatch.build(ForwardMode.DRAFT, [(ids, 0, [1, 2])], 4, logits_rows="all")
    hidden = torch.randn(len(ids), runner.config.hidden_size)  # the MTP layer ignores the hidden half
    logits = runner.mtp_forward(batch, batch.input_ids, hidden, kv).logits
    assert logits.argmax(-1).tolist() == [f[i] for i in ids]
