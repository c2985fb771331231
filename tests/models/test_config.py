"""ModelConfig parsing: transformers-5 and original config.json layouts of both architectures."""

import json

import pytest

from glmserve.shared.config.model import ModelConfig

GLM47 = {  # zai-org/GLM-4.7 config.json keys (spec §1.1), original top-level rope keys
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120,
    "num_hidden_layers": 92, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "partial_rotary_factor": 0.5, "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-5,
    "use_qk_norm": True, "attention_bias": True, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 202752, "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
}
FLASH = {  # GLM-4.7-Flash (spec §2.1), transformers-5 rope_parameters layout, no mlp_layer_types
    "model_type": "glm4_moe_lite", "vocab_size": 154880, "hidden_size": 2048, "num_hidden_layers": 47,
    "num_attention_heads": 20, "num_key_value_heads": 20, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "intermediate_size": 10240,
    "moe_intermediate_size": 1536, "n_routed_experts": 64, "num_experts_per_tok": 4, "routed_scaling_factor": 1.8,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "eos_token_id": [154820, 154827, 154829],
    "pad_token_id": 154820,
}


def test_glm47_original_layout():
    c = ModelConfig.from_dict(GLM47)
    assert (c.head_dim, c.rotary_dim, c.rope_theta) == (128, 64, 1e6)
    assert c.mlp_layer_types[:4] == ("dense", "dense", "dense", "sparse") and len(c.mlp_layer_types) == 92
    assert c.is_moe_layer(92) and not c.is_moe_layer(2) and c.mtp_layer_index == 92
    assert c.eos_token_ids == (151329, 151336, 151338) and c.pad_token_id == 151329
    assert c.use_qk_norm and c.attention_bias and c.routed_scaling_factor == 2.5 and not c.is_mla
    assert c.quantization is None and c.torch_dtype == "bfloat16"


def test_transformers5_rope_parameters_layout():
    d = {k: v for k, v in GLM47.items() if k not in ("rope_theta", "partial_rotary_factor")}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.25}
    c = ModelConfig.from_dict(d)
    assert (c.rope_theta, c.rotary_dim) == (500000.0, 32)
    assert ModelConfig.from_dict({**d, "rope_parameters": None}).rotary_dim == 64  # HF default factor 0.5


def test_flash_mla_fields():
    c = ModelConfig.from_dict(FLASH)
    assert c.is_mla and c.rope_interleave and c.qk_head_dim == 256 and c.head_dim == 64
    assert c.kv_lora_rank + c.qk_rope_head_dim == 576 and c.rotary_dim == 64
    assert c.mlp_layer_types[0] == "dense" and set(c.mlp_layer_types[1:]) == {"sparse"}
    explicit = ModelConfig.from_dict({**FLASH, "num_hidden_layers": 3, "mlp_layer_types": ["dense", "dense", "sparse"]})
    assert explicit.mlp_layer_types == ("dense", "dense", "sparse")


def test_compressed_tensors_quantization():
    q = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*mlp.gate$"],
         "config_groups": {"group_0": {"targets": ["Linear"],
                                       "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                       "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    c = ModelConfig.from_dict({**GLM47, "quantization_config": q})
    assert c.quantization.method == "compressed-tensors" and c.quantization.weight_strategy == "channel"
    assert c.quantization.dynamic_activations and "lm_head" in c.quantization.ignore


def test_unknown_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**GLM47, "model_type": "llama"}))
    with pytest.raises(ValueError, match="glm4_moe, glm4_moe_lite"):
        ModelConfig.from_dir(str(tmp_path))


def test_tiny_checkpoint_config(tmp_path):
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    c = ModelConfig.from_dir(write_tiny_checkpoint(str(tmp_path / "t"), "glm4_moe", vocab_size=300, eos_token_id=[7]))
    assert c.vocab_size == 300 and c.eos_token_ids == (7,) and c.num_nextn_predict_layers == 1
    assert c.n_group > c.topk_group and c.routed_scaling_factor != 1 and c.first_k_dense_replace >= 1


def test_tiny_checkpoint_with_builtin_tokenizer(tmp_path, capsys):
    from glmserve.shared.generate import main
    from glmserve.shared.tokenizer import load_tokenizer
    from glmserve.shared.tokenizer.builtin import BUILTIN_EOS_IDS, BUILTIN_VOCAB_SIZE
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(str(tmp_path / "t"), "glm4_moe_lite", with_tokenizer=True, num_nextn_predict_layers=0)
    c = ModelConfig.from_dir(d)
    assert c.vocab_size == BUILTIN_VOCAB_SIZE and c.eos_token_ids == BUILTIN_EOS_IDS and c.num_nextn_predict_layers == 0
    assert load_tokenizer(d).vocab_size == BUILTIN_VOCAB_SIZE
    main(["--model-dir", d, "--prompt", "hello", "--max_new_tokens", "3", "--ignore-eos"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"]
    assert len(out) == 1 and len(out[0]["token_ids"]) == 3 and all(lp <= 0 for lp in out[0]["logprobs"])


@pytest.mark.parametrize("name", ["glm-4.5-air", "glm-4.7", "glm-4.7-flash"])
def test_presets_parse(tmp_path, name):
    from glmserve.shared.config.presets import write_preset
    from glmserve.shared.runner.model_runner import ModelRunner

    c = ModelConfig.from_dir(write_preset(str(tmp_path / name), name, fp8=True))
    assert c.quantization is not None and c.num_nextn_predict_layers == 1
    small = write_preset(str(tmp_path / "small"), name, hidden_size=64, num_hidden_layers=2, vocab_size=512,
                         intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=16, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                         v_head_dim=16, n_routed_experts=16)
    runner = ModelRunner(small, load_format="dummy")  # config-only dir: dummy weights need no safetensors
    assert runner.has_mtp
