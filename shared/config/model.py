"""Model configuration parsed once from a Hugging Face config.json (every process that runs the model).

Supports `glm4_moe` (GLM-4.5/4.6/4.7, GQA + partial NeoX RoPE) and `glm4_moe_lite` (GLM-4.7-Flash, MLA).
Reads both the transformers-5 layout (`rope_parameters = {rope_theta, partial_rotary_factor}`) and the
original top-level keys (`rope_theta`, `partial_rotary_factor`). Facts: ../shared/spec/glm.md §1-4.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm4_moe", "glm4_moe_lite")


@dataclass(frozen=True)
class QuantConfig:
    """FP8 weights: compressed-tensors per-channel (GLM-4.x-FP8) or the block-scaled `fp8` method."""

    method: str  # "compressed-tensors" | "fp8"
    weight_strategy: str = "channel"  # "channel" (weight_scale [out, 1]) | "block" (weight_scale_inv)
    weight_block_size: tuple[int, int] | None = None
    dynamic_activations: bool = True  # per-token activation scales computed at run time
    ignore: tuple[str, ...] = ()  # module names (or "re:" regexes) left unquantized

    @staticmethod
    def from_hf(q: dict[str, Any]) -> "QuantConfig":
        method = q.get("quant_method", "")
        if method == "compressed-tensors":
            group = next(iter(q.get("config_groups", {}).values()), {})
            w = group.get("weights") or {}
            a = group.get("input_activations") or {}
            if w.get("num_bits", 8) != 8 or w.get("type", "float") != "float":
                raise ValueError(f"unsupported compressed-tensors weights {w}; only 8-bit float")
            return QuantConfig(
                method=method,
                weight_strategy=w.get("strategy", "channel"),
                weight_block_size=tuple(w["block_structure"]) if w.get("block_structure") else None,
                dynamic_activations=bool(a.get("dynamic", True)),
                ignore=tuple(q.get("ignore", ())),
            )
        if method == "fp8":
            block = q.get("weight_block_size")
            return QuantConfig(
                method=method,
                weight_strategy="block" if block else "channel",
                weight_block_size=tuple(block) if block else None,
                dynamic_activations=q.get("activation_scheme", "dynamic") == "dynamic",
                ignore=tuple(q.get("modules_to_not_convert") or q.get("ignored_layers") or ()),
            )
        raise ValueError(f"unsupported quantization_config.quant_method {method!r} (compressed-tensors, fp8)")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    moe_intermediate_size: int  # width of one routed expert (and of each shared expert)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # glm4_moe: explicit head_dim; lite: qk_rope_head_dim (HF alias)
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    attention_bias: bool
    use_qk_norm: bool
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse" per main layer
    num_nextn_predict_layers: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    quantization: QuantConfig | None = None
    # MLA (glm4_moe_lite) only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    @property
    def is_mla(self) -> bool:
        return self.model_type == "glm4_moe_lite"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def mtp_layer_index(self) -> int:
        """Checkpoint index of the (first) MTP layer: model.layers.{num_hidden_layers}."""
        return self.num_hidden_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        """MTP layers (layer_id >= num_hidden_layers) are always MoE."""
        if layer_id >= self.num_hidden_layers:
            return True
        return self.mlp_layer_types[layer_id] == "sparse"

    @staticmethod
    def from_dir(model_dir: str) -> "ModelConfig":
        with open(os.path.join(model_dir, "config.json")) as f:
            return ModelConfig.from_dict(json.load(f))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        return _parse(d, model_type == "glm4_moe_lite")


def _rope(d: dict[str, Any], is_mla: bool) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, rope_scaling) from the new or the old layout."""
    rp = d.get("rope_parameters") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    default_factor = 1.0 if is_mla else 0.5
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", default_factor))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    scaling = d.get("rope_scaling")
    if rope_type != "default":
        scaling = dict(rp)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {scaling} is not supported (GLM-4.x uses default RoPE)")
    return float(theta), float(factor), scaling


def _eos(d: dict[str, Any]) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _mlp_types(d: dict[str, Any], num_layers: int, first_k: int) -> tuple[str, ...]:
    """Explicit mlp_layer_types (HF lite reads only these) else first_k_dense_replace dense layers."""
    if d.get("mlp_layer_types"):
        mlp_types = tuple(d["mlp_layer_types"])
    else:
        mlp_types = tuple("dense" if i < first_k else "sparse" for i in range(num_layers))
    if len(mlp_types) != num_layers or set(mlp_types) - {"dense", "sparse"}:
        raise ValueError(f"mlp_layer_types {mlp_types} must list 'dense'/'sparse' for {num_layers} layers")
    return mlp_types


def _parse(d: dict[str, Any], is_mla: bool) -> ModelConfig:
    num_layers = int(d.get("num_hidden_layers", 47 if is_mla else 46))
    first_k = int(d.get("first_k_dense_replace", 1))
    mlp_types = _mlp_types(d, num_layers, first_k)
    theta, factor, scaling = _rope(d, is_mla)
    heads = int(d.get("num_attention_heads", 20 if is_mla else 96))
    hidden = int(d.get("hidden_size", 2048 if is_mla else 4096))
    qk_rope = int(d.get("qk_rope_head_dim", 64))
    head_dim = qk_rope if is_mla else int(d.get("head_dim") or hidden // heads)
    q = d.get("quantization_config")
    return ModelConfig(
        model_type=d["model_type"],
        vocab_size=int(d.get("vocab_size", 154880 if is_mla else 151552)),
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size", 10240 if is_mla else 10944)),
        moe_intermediate_size=int(d.get("moe_intermediate_size", 1536 if is_mla else 1408)),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads", heads if is_mla else 8)),
        head_dim=head_dim,
        partial_rotary_factor=factor,
        rope_theta=theta,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(d.get("attention_bias", False)),
        use_qk_norm=bool(d.get("use_qk_norm", False)) and not is_mla,
        **_moe_fields(d, is_mla),
        first_k_dense_replace=first_k,
        mlp_layer_types=mlp_types,
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0),
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(d),
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"),
        hidden_act=d.get("hidden_act", "silu"),
        torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        rope_scaling=scaling,
        quantization=QuantConfig.from_hf(q) if q else None,
        **(_mla_fields(d) if is_mla else {}),
    )


def _moe_fields(d: dict[str, Any], is_mla: bool) -> dict[str, Any]:
    return dict(
        n_routed_experts=int(d.get("n_routed_experts", 64 if is_mla else 128)),
        n_shared_experts=int(d.get("n_shared_experts", 1)),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 4 if is_mla else 8)),
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.8 if is_mla else 1.0)),
    )


def _mla_fields(d: dict[str, Any]) -> dict[str, Any]:
    """glm4_moe_lite attention fields (HF defaults = GLM-4.7-Flash; no rope_interleave key means True)."""
    q_lora = d.get("q_lora_rank", 768)
    return dict(
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(d.get("kv_lora_rank", 512)),
        qk_nope_head_dim=int(d.get("qk_nope_head_dim", 192)),
        qk_rope_head_dim=int(d.get("qk_rope_head_dim", 64)),
        v_head_dim=int(d.get("v_head_dim", 256)),
        rope_interleave=bool(d.get("rope_interleave", True)),
    )
