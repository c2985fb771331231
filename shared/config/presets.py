"""config.json of the real GLM-4.x checkpoints (spec §1.1, §2.1), for `--load-format dummy` runs at the
real shape (benchmarks, GPU smoke tests; any process). `write_preset(dir, name)` writes only config.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

_GLM4_MOE_COMMON: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5,
    "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-5, "attention_bias": True, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
PRESETS: dict[str, dict[str, Any]] = {
    "glm-4.5-air": {**_GLM4_MOE_COMMON, "hidden_size": 4096, "num_hidden_layers": 46, "use_qk_norm": False,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 128,
                    "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "max_position_embeddings": 131072},
    "glm-4.7": {**_GLM4_MOE_COMMON, "hidden_size": 5120, "num_hidden_layers": 92, "use_qk_norm": True,
                "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160,
                "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "max_position_embeddings": 202752},
    "glm-4.7-flash": {
        "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 154880,
        "hidden_size": 2048, "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20,
        "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-5, "attention_bias": False,
        "intermediate_size": 10240, "moe_intermediate_size": 1536, "n_routed_experts": 64, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.8, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "max_position_embeddings": 202752,
        "tie_word_embeddings": False, "eos_token_id": [154820, 154827, 154829], "pad_token_id": 154820,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
}
FP8_QUANT_CONFIG: dict[str, Any] = {  # GLM-4.x-FP8 (compressed-tensors, per-channel weights, dynamic per-token acts)
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "ignore": ["lm_head", "re:.*embed_tokens$", "re:.*norm$", "re:.*mlp\\.gate$", "re:.*eh_proj$"],
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                              "strategy": "channel"},
                                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                        "dynamic": True, "strategy": "token"}}},
}


def write_preset(path: str, name: str, fp8: bool = False, **overrides: Any) -> str:
    """Write config.json of preset `name` (+ FP8 quantization_config) into `path`; returns path."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config = {**PRESETS[name], **overrides}
    if fp8:
        config["quantization_config"] = FP8_QUANT_CONFIG
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


if __name__ == "__main__":  # python -m glmserve.shared.config.presets DIR NAME [--fp8]
    import sys

    args = [a for a in sys.argv[1:] if a != "--fp8"]
    print(write_preset(args[0], args[1], fp8="--fp8" in sys.argv))
