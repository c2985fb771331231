"""Tokenizer, GLM chat templates and incremental detokenization (router process).

Public API: `load_tokenizer`, `GlmTokenizer`, `IncrementalDetokenizer`; the built-in
tokenizer of the embedded default model is in `shared.tokenizer.builtin`.
"""
from glmserve.shared.tokenizer.detokenizer import IncrementalDetokenizer
from glmserve.shared.tokenizer.glm_tokenizer import GlmTokenizer, load_tokenizer, normalize_messages

__all__ = ["GlmTokenizer", "IncrementalDetokenizer", "load_tokenizer", "normalize_messages"]
