"""Weight loading by checkpoint names: unknown and missing keys are errors that name them; MTP keys are
loaded only when the MTP layer is built; the MTP's optional embed/head copies are skipped."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.tiny import write_tiny_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return write_tiny_checkpoint(str(tmp_path / "c"), "glm4_moe", seed=2)


def _edit_mtp_shard(model_dir, fn):
    path = os.path.join(model_dir, "model-mtp.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_unknown_key_is_an_error(ckpt):
    _edit_mtp_shard(ckpt, lambda sd: sd.__setitem__("model.layers.1.self_attn.extra_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(KeyError, match="model.layers.1.self_attn.extra_proj.weight"):
        ModelRunner(ckpt)


def test_missing_key_is_an_error(ckpt):
    _edit_mtp_shard(ckpt, lambda sd: sd.pop("model.layers.3.hnorm.weight"))
    with pytest.raises(KeyError, match="model.layers.3.hnorm.weight"):
        ModelRunner(ckpt)
    ModelRunner(ckpt, with_mtp=False)  # without the MTP layer nothing of layer 3 is needed


def test_missing_part_of_a_merged_layer_is_an_error(ckpt):
    _edit_mtp_shard(ckpt, lambda sd: sd.pop("model.layers.3.self_attn.k_proj.bias"))
    with pytest.raises(KeyError, match=r"model\.layers\.3\.self_attn\.k_proj\.bias"):
        ModelRunner(ckpt)


def test_missing_expert_is_an_error(ckpt):
    _edit_mtp_shard(ckpt, lambda sd: sd.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    with pytest.raises(KeyError, match="model.layers.3.mlp.experts"):
        ModelRunner(ckpt)


def test_mtp_optional_copies_are_skipped(ckpt):
    def add(sd):
        sd["model.layers.3.embed_tokens.weight"] = torch.zeros(256, 64)
        sd["model.layers.3.shared_head.head.weight"] = torch.zeros(256, 64)
        sd["model.layers.3.shared_head.head.weight_scale"] = torch.ones(256, 1)
    _edit_mtp_shard(ckpt, add)
    runner = ModelRunner(ckpt)
    assert runner.has_mtp and runner.kv_layout(4).num_layers == 4
    assert ModelRunner(ckpt, with_mtp=False).kv_layout(4).num_layers == 3


def test_tied_embeddings_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from glmserve.shared.kvcache.cache import PagedKVCache
    from glmserve.shared.runner.batch import ForwardBatch, ForwardMode

    d = write_tiny_checkpoint(str(tmp_path / "tied"), "glm4_moe", tie_word_embeddings=True)
    runner = ModelRunner(d)
    kv = PagedKVCache(runner.kv_layout(4), 8)
    out = runner.forward(ForwardBatch.build(ForwardMode.PREFILL, [([3, 4, 5, 6, 7], 0, [1, 2])], 4), kv)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([[3, 4, 5, 6, 7]])).logits[0, -1]
    assert float((out.logits[0] - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_transformers_fused_expert_layout_loads(tmp_path):
    """A checkpoint saved with save_original_format=False (fused experts) gives the same logits."""
    from transformers import AutoModelForCausalLM

    from glmserve.shared.kvcache.cache import PagedKVCache
    from glmserve.shared.runner.batch import ForwardBatch, ForwardMode

    src = write_tiny_checkpoint(str(tmp_path / "orig"), "glm4_moe_lite", num_nextn_predict_layers=0)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(
        str(tmp_path / "fused"), save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(str(tmp_path / "fused" / "model.safetensors")))
    outs = []
    for d in (src, str(tmp_path / "fused")):
        runner = ModelRunner(d)
        kv = PagedKVCache(runner.kv_layout(4), 8)
        outs.append(runner.forward(ForwardBatch.build(ForwardMode.PREFILL, [([3, 4, 5, 6, 7], 0, [1, 2])], 4), kv).logits)
    assert torch.equal(outs[0], outs[1])
