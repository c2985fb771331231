"""What every endpoint of the router needs, built once at startup.

Runs in the router process.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.router.config import RouterConfig
from glmserve.router.dispatch import Dispatcher
from glmserve.router.metrics import RouterMetrics


@dataclass(frozen=True)
class RouterState:
    cfg: RouterConfig
    tokenizer: object  # shared.tokenizer GlmTokenizer (encode, decode, apply_chat_template, eos_token_ids)
    dispatcher: Dispatcher
    metrics: RouterMetrics

    @property
    def vocab_size(self) -> int:
        """Token ids accepted in prompts and stop_token_ids: the model's vocabulary when known."""
        return self.cfg.model_vocab_size or self.tokenizer.vocab_size
