"""Write small random GLM checkpoints in the real HF layout (tests in every part; no process runs it at serve time).

`write_tiny_checkpoint` builds a transformers `Glm4MoeForCausalLM` / `Glm4MoeLiteForCausalLM` with the
features the real models use turned on (QK-norm, q/k/v bias, partial rotary, dense first layers, grouped
top-k routing, non-zero correction biases, scaling != 1), `save_pretrained`s it, and then adds the MTP
layer `model.layers.{L}.*` (which HF does not build) as a second safetensors shard with an index, so
the directory looks like a real zai-org checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

GLM4_MOE_TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True,
    use_qk_norm=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=2,
    topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
    num_nextn_predict_layers=1, max_position_embeddings=512, tie_word_embeddings=False,
    eos_token_id=[1, 2], pad_token_id=0, bos_token_id=None,
)
GLM4_MOE_LITE_TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0,
    rms_norm_eps=1e-5, attention_bias=False, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
    first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"], num_nextn_predict_layers=1,
    max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=[1, 2], pad_token_id=0,
    bos_token_id=None, rope_interleave=True,
)


def _hf_config(arch: str, overrides: dict[str, Any]):
    from transformers import Glm4MoeConfig, Glm4MoeLiteConfig

    if arch == "glm4_moe":
        d = {**GLM4_MOE_TINY, **overrides}
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta"),
                "partial_rotary_factor": d.pop("partial_rotary_factor")}
        return Glm4MoeConfig(rope_parameters=rope, **d)
    if arch == "glm4_moe_lite":
        d = {**GLM4_MOE_LITE_TINY, **overrides}
        if "num_hidden_layers" in overrides and "mlp_layer_types" not in overrides:
            k = d["first_k_dense_replace"]
            d["mlp_layer_types"] = ["dense" if i < k else "sparse" for i in range(d["num_hidden_layers"])]
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        return Glm4MoeLiteConfig(rope_parameters=rope, **d)
    raise ValueError(f"unknown arch {arch!r}; supported: glm4_moe, glm4_moe_lite")


@torch.no_grad()
def _randomize(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Every weight random (norm weights near 1, correction biases non-zero but not pinning)."""
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif "e_score_correction_bias" in name:
            p.copy_(0.05 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(std * noise)


def _mtp_tensors(model, config, gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """model.layers.{L}.* for one MTP layer in checkpoint (per-expert) names; the block is always MoE."""
    n = config.num_hidden_layers
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "mlp_layer_types"):
        cfg.mlp_layer_types = list(cfg.mlp_layer_types) + ["sparse"]
    layer = type(model.model.layers[-1])(cfg, n)
    _randomize(layer, gen, std)
    out: dict[str, torch.Tensor] = {}
    for name, t in layer.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            i = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.gate_proj.weight"] = t[e, :i]
                out[f"mlp.experts.{e}.up_proj.weight"] = t[e, i:]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    h = config.hidden_size
    out["enorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
    out["hnorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
    out["shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
    out["eh_proj.weight"] = std * torch.randn(h, 2 * h, generator=gen)
    return {f"model.layers.{n}.{k}": v.contiguous().clone() for k, v in out.items()}


def _add_shard(path: str, extra: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Add `extra` as model-mtp.safetensors and (re)write model.safetensors.index.json."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = {k: "model.safetensors" for k in load_file(os.path.join(path, "model.safetensors"))}
    extra = {k: (v if "e_score_correction_bias" in k else v.to(dtype)) for k, v in extra.items()}
    save_file(extra, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "model-mtp.safetensors" for k in extra})
    total = sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values()))
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)


def write_tiny_checkpoint(
    path: str, arch: str = "glm4_moe", seed: int = 0, dtype: torch.dtype = torch.float32,
    std: float = 0.08, with_tokenizer: bool = False, **config_overrides: Any,
) -> str:
    """Write a random HF checkpoint of `arch` at `path` (created) and return `path`.

    config_overrides replace the tiny defaults (vocab_size, eos_token_id, hidden_size, n_routed_experts ...);
    `num_nextn_predict_layers=0` leaves the MTP shard out. with_tokenizer=True also writes the built-in
    tokenizer (shared.tokenizer.builtin) and sets vocab_size / eos / pad ids to match it.
    """
    from transformers import Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM

    if with_tokenizer:
        from glmserve.shared.tokenizer.builtin import (BUILTIN_EOS_IDS, BUILTIN_PAD_ID, BUILTIN_VOCAB_SIZE,
                                              write_builtin_tokenizer)

        config_overrides = {"vocab_size": BUILTIN_VOCAB_SIZE, "eos_token_id": list(BUILTIN_EOS_IDS),
                            "pad_token_id": BUILTIN_PAD_ID, **config_overrides}
        write_builtin_tokenizer(path)

    config = _hf_config(arch, config_overrides)
    gen = torch.Generator().manual_seed(seed)
    cls = Glm4MoeForCausalLM if arch == "glm4_moe" else Glm4MoeLiteForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    _randomize(model, gen, std)
    model = model.to(dtype)
    for layer in model.model.layers:  # HF keeps the correction bias fp32
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    num_mtp = int(config_overrides.get("num_nextn_predict_layers", 1))
    if num_mtp > 0:
        _add_shard(path, _mtp_tensors(model, config, gen, std), dtype)
        _set_config_key(path, "num_nextn_predict_layers", num_mtp)
    return path


def _set_config_key(path: str, key: str, value: Any) -> None:
    """Lite configs have no num_nextn_predict_layers attribute in HF: write it like the real config.json."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[key] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
