"""model_type -> model class (each worker rank)."""

from __future__ import annotations

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.base import GlmMoeCausalLM
from glmserve.shared.model.glm4_moe import Glm4MoeForCausalLM
from glmserve.shared.model.glm4_moe_lite import Glm4MoeLiteForCausalLM

MODELS: dict[str, type[GlmMoeCausalLM]] = {
    "glm4_moe": Glm4MoeForCausalLM,
    "glm4_moe_lite": Glm4MoeLiteForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[GlmMoeCausalLM]:
    return MODELS[cfg.model_type]
