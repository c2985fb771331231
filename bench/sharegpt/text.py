"""Token counting and prompt text for the load test (benchmark client process).

A `TokenCounter` wraps a tokenizer when one is given (`--tokenizer PATH` or the model dir: the
project's `shared.tokenizer.load_tokenizer`, else transformers' AutoTokenizer). Without one it
counts whitespace-separated words, which is what the synthetic word text is built from; the
report says which counter was used, and the server's `usage` replaces client counts where it
answers with one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

# Short common English words: about one BPE token each in GLM / Llama-style tokenizers.
WORDS = (
    "the of and to in is that it for on was with as be at by this from or have an they which "
    "one you were all we can her has there been if more when will would who so no time could "
    "about out up them some what into only other new people than first water been call who oil "
    "its now find long down day did get come made may part over such make well also after back"
).split()


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TokenCounter:
    """Counts tokens of text; `name` goes into the report ("words" when no tokenizer)."""

    tokenizer: Any = None
    name: str = "words"

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text))

    def vocab_size(self) -> int | None:
        if self.tokenizer is None:
            return None
        size = getattr(self.tokenizer, "vocab_size", None)
        return int(size() if callable(size) else size) if size is not None else None

    def text_of(self, rng: random.Random, num_tokens: int) -> str:
        """Text of about `num_tokens` tokens (exact with a tokenizer whose decode/encode round-trips)."""
        words = " ".join(rng.choice(WORDS) for _ in range(max(num_tokens, 1)))
        if self.tokenizer is None:
            return words
        ids = self.tokenizer.encode(words)[:num_tokens]
        return self.tokenizer.decode(ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(WORDS[i % len(WORDS)] for i in ids)
        return self.tokenizer.decode(ids)


def load_counter(path: str | None) -> TokenCounter:
    """Tokenizer from a model dir or tokenizer path; the word counter when `path` is None."""
    if not path:
        return TokenCounter()
    try:
        from glmserve.shared.tokenizer import load_tokenizer  # the project's own (optional dependency)

        return TokenCounter(load_tokenizer(path, None), name=f"glmserve:{path}")
    except Exception:  # noqa: BLE001 - fall back to HF's loader for other engines' models
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return TokenCounter(_HFAdapter(tok), name=f"hf:{path}")


@dataclass
class _HFAdapter:
    tok: Any

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)
