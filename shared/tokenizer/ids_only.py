"""`IdsOnlyTokenizer`: what the router serves with when the checkpoint has no tokenizer.json.

Runs in the router process. As vLLM's `--skip-tokenizer-init`: prompts must be token ids
(/v1/completions `prompt: [ids]`, `return_token_ids` to read the output ids); text prompts, chat,
stop strings and logprob text need a tokenizer and are refused with `NoTokenizerError` (a
ValueError the router turns into a 400). Output text is always "" (ids decode to nothing).
EOS ids come from generation_config.json / config.json, as for a real tokenizer.
"""
import os

from glmserve.shared.tokenizer.glm_tokenizer import read_json, config_eos_ids


class NoTokenizerError(ValueError):
    """A request needs text <-> ids but the model has no tokenizer (client error: 400)."""


class IdsOnlyTokenizer:
    """The GlmTokenizer interface without a vocabulary: encode / chat refuse, decode is ""."""

    chat_template = None
    template_format = "none"
    special_token_ids: dict[str, int] = {}
    special_ids: frozenset[int] = frozenset()

    def __init__(self, model_dir: str, reason: str):
        self.name = model_dir
        self.reason = reason  # e.g. "no tokenizer.json in /models/x"
        self.vocab_size = int(read_json(os.path.join(model_dir, "config.json")).get("vocab_size") or 0)
        self.eos_token_ids = tuple(config_eos_ids(model_dir))

    def refuse(self, what: str):
        raise NoTokenizerError(f"{what} needs a tokenizer, and this model has none ({self.reason}); send the "
                               "prompt as token ids to /v1/completions (\"prompt\": [1, 2, 3]) and read the "
                               "output with \"return_token_ids\": true")

    def encode(self, text: str) -> list[int]:
        self.refuse("a text prompt")

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
        self.refuse("chat (the chat template)")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def token_to_id(self, token: str) -> int | None:
        return None
