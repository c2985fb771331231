"""Configuration parsed once at process start (model config from the HF config.json; every process)."""

from glmserve.shared.config.model import ModelConfig, QuantConfig

__all__ = ["ModelConfig", "QuantConfig"]
