"""`GlmTokenizer` and `load_tokenizer`: a checkpoint's tokenizer plus its GLM chat template.

Runs in the router process (and in bench / tests). Reads tokenizer.json through the Rust
`tokenizers` library (no transformers import, no network), tokenizer_config.json /
chat_template.jinja for the template and config.json / generation_config.json for the EOS ids.
Without a template a built-in GLM-4.5 or GLM-4.7 template is used (templates.py); without a
model dir the built-in tokenizer (builtin.py) is used.
"""
import copy
import json
import logging
import os
from typing import Any

from tokenizers import Tokenizer

from glmserve.shared.tokenizer.render import render_chat_template
from glmserve.shared.tokenizer.templates import TEMPLATES, detect_template_format

logger = logging.getLogger(__name__)

LONG_TEXT_CHARS = 16384  # from here on, encode without holding the GIL
# Stop tokens of every GLM-4.x model (spec §9) when the checkpoint names none.
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# Tags the reasoning / tool-call parsers read: never dropped by skip_special_tokens, whatever the
# checkpoint marks as special (vLLM instead forces skip_special_tokens=False when tools are on).
PARSER_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
               "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>")


class GlmTokenizer:
    """Encode / decode / chat template of one checkpoint. Immutable after construction."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, template_format: str,
                 eos_token_ids: tuple[int, ...], name: str = ""):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.template_format = template_format  # "glm45" | "glm47"
        self.eos_token_ids = eos_token_ids
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        self.special_token_ids: dict[str, int] = {t.content: i for i, t in sorted(added.items())}
        # ids skip_special_tokens drops: the special added tokens except the parser tags
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in added.items() if t.special and t.content not in PARSER_TAGS)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS (the template writes [gMASK]<sop> itself).

        Long texts go through encode_batch, which releases the GIL while it runs (encode holds it:
        a 4 MB prompt would stop every other thread of the router for seconds)."""
        if len(text) < LONG_TEXT_CHARS:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the tokenizer does not know decode to nothing; PARSER_TAGS always kept."""
        known = [i for i in map(int, ids) if 0 <= i < self.vocab_size and self._tok.id_to_token(i) is not None]
        if skip_special_tokens:
            known = [i for i in known if i not in self.special_ids]
        return self._tok.decode(known, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **chat_template_kwargs: Any) -> str:
        """Prompt text of an OpenAI conversation; ValueError on malformed tool-call arguments."""
        plain = normalize_messages(messages)
        return render_chat_template(self.chat_template, plain, tools=tools or None,
                                    add_generation_prompt=add_generation_prompt, **chat_template_kwargs)


def _arguments_dict(arguments: Any) -> dict:
    """OpenAI sends `function.arguments` as a JSON string; GLM templates iterate a dict."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return arguments


def normalize_messages(messages: list[dict]) -> list[dict]:
    """A deep copy with each tool call as {"type", "id"?, "function": {"name", "arguments": dict}}."""
    out = copy.deepcopy(list(messages))
    for message in out:
        if not message.get("tool_calls"):
            continue
        calls = []
        for call in message["tool_calls"]:
            function = dict(call.get("function") or call)
            function["arguments"] = _arguments_dict(function.get("arguments"))
            calls.append({**call, "function": function})
        message["tool_calls"] = calls
    return out


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _template_from_config(model_dir: str, tok_config: dict) -> str | None:
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def config_eos_ids(model_dir: str | None) -> list[int]:
    """EOS ids named by generation_config.json, then config.json (in that order, no repeats)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = read_json(os.path.join(model_dir, name)).get("eos_token_id") if model_dir else None
        for i in ([value] if isinstance(value, int) else value or []):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _eos_ids(tok: Tokenizer, model_dir: str | None, tok_config: dict) -> tuple[int, ...]:
    ids = config_eos_ids(model_dir)
    if not ids:
        names = [tok_config.get("eos_token"), *GLM_STOP_TOKENS]
        for token in names:
            token = token.get("content") if isinstance(token, dict) else token
            i = tok.token_to_id(token) if token else None
            if i is not None and i not in ids:
                ids.append(i)
    return tuple(ids)


def _default_format(model_dir: str | None) -> str:
    model_type = read_json(os.path.join(model_dir, "config.json")).get("model_type") if model_dir else None
    return "glm45" if model_type == "glm4_moe" else "glm47"


def load_tokenizer(model_dir: str | None, tokenizer: str | None = None,
                   template_format: str | None = None) -> GlmTokenizer:
    """Tokenizer of `tokenizer` (a dir or a tokenizer.json path) or else of `model_dir`.

    Both None: the built-in tokenizer. `template_format` ("glm45" | "glm47") picks the built-in
    template when the checkpoint has none; otherwise it is detected from the checkpoint's template,
    else from config.json's model_type (glm4_moe -> glm45, anything else -> glm47).
    """
    path = tokenizer or model_dir
    if path is None:
        from glmserve.shared.tokenizer.builtin import builtin_tokenizer_config, builtin_tokenizer_json
        tok, tok_config, tok_dir = Tokenizer.from_str(builtin_tokenizer_json()), builtin_tokenizer_config(), None
    else:
        tok_dir = os.path.dirname(path) if path.endswith(".json") else path
        tok_file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} not found (write one with "
                                    "shared.tokenizer.builtin.write_builtin_tokenizer for tiny models)")
        tok, tok_config = Tokenizer.from_file(tok_file), read_json(os.path.join(tok_dir, "tokenizer_config.json"))
    template = _template_from_config(tok_dir, tok_config) if tok_dir else tok_config.get("chat_template")
    fmt = template_format or _default_format(model_dir)
    if path is None and template_format:  # built-in tokenizer: the argument picks its template
        template = None
    if template:
        fmt = detect_template_format(template, default=fmt)  # the checkpoint's own template decides
    else:
        logger.info("no chat template in %s: using the built-in %s template", path, fmt)
        template = TEMPLATES[fmt]
    eos_dir = model_dir if model_dir is not None else tok_dir
    return GlmTokenizer(tok, template, fmt, _eos_ids(tok, eos_dir, tok_config), name=path or "builtin")
