"""Range and cross-field checks of requests, and their translation to `SamplingParams`.

Runs in the router process, before anything is dispatched: every problem here is a 400
with the offending field in `param`. Types were already checked by msgspec (schemas.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glmserve.router.config import RouterConfig
from glmserve.router.errors import bad
from glmserve.router.schemas import ChatMessage, SamplingFields
from glmserve.shared.protocol import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 512
MAX_SEED = 2**63 - 1
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class TextOptions:
    """How token ids become text for one request (shared by its choices)."""

    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    skip_special_tokens: bool = True


def check_float(value: float | None, name: str, lo: float, hi: float, default: float,
                lo_open: bool = False) -> float:
    if value is None:
        return default
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise bad(f"{name} must be in {left}{lo}, {hi}], got {value}", param=name)
    return float(value)


def check_int(value: int | None, name: str, lo: int, hi: int, default: int) -> int:
    if value is None:
        return default
    if value < lo or value > hi:
        raise bad(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return value


def check_stop(stop: str | list[str] | None, name: str = "stop") -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param=name)
    for s in items:
        if not s or len(s) > MAX_STOP_LEN:
            raise bad(f"each stop string must have 1..{MAX_STOP_LEN} characters", param=name)
    return tuple(items)


def check_token_ids(ids: list, name: str, vocab_size: int) -> list[int]:
    for t in ids:
        if type(t) is not int or t < 0 or t >= vocab_size:
            raise bad(f"{name} must hold token ids in [0, {vocab_size}), got {t!r}", param=name)
    return ids


def check_max_tokens(max_tokens: int | None, prompt_len: int, cfg: RouterConfig, name: str,
                     default: int | None) -> int:
    """max_tokens within (0, limit] and prompt_len + max_tokens <= --max_req_total_len."""
    room = cfg.max_req_total_len - prompt_len
    if prompt_len == 0:
        raise bad("the prompt is empty", param="prompt" if name != "max_completion_tokens" else "messages")
    if room <= 0:
        raise bad(f"the prompt has {prompt_len} tokens; the limit (prompt + output) is "
                  f"{cfg.max_req_total_len}", param="messages" if default is None else "prompt",
                  code="context_length_exceeded")
    if max_tokens is None:
        return min(default, room) if default is not None else room
    if max_tokens <= 0:
        raise bad(f"{name} must be at least 1, got {max_tokens}", param=name)
    if max_tokens > room:
        raise bad(f"{name}={max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                  f"the limit of {cfg.max_req_total_len} tokens", param=name, code="context_length_exceeded")
    return max_tokens


def sampling_params(req: SamplingFields, max_new_tokens: int, vocab_size: int, cfg: RouterConfig,
                    logprobs: bool, top_logprobs: int) -> SamplingParams:
    """The request's sampling fields, range-checked (temperature 0 = greedy)."""
    temperature = check_float(req.temperature, "temperature", 0.0, 100.0, 1.0)
    top_p = check_float(req.top_p, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    top_k = check_int(req.top_k, "top_k", -1, vocab_size, -1)
    if top_k == 0:
        raise bad("top_k must be -1 (off) or >= 1, got 0", param="top_k")
    seed = check_int(req.seed, "seed", 0, MAX_SEED - cfg.max_n, 0) if req.seed is not None else None
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=check_float(req.min_p, "min_p", 0.0, 1.0, 0.0),
        frequency_penalty=check_float(req.frequency_penalty, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=check_float(req.presence_penalty, "presence_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=check_float(req.repetition_penalty, "repetition_penalty", 0.0, 10.0, 1.0,
                                       lo_open=True),
        max_new_tokens=max_new_tokens,
        stop_token_ids=check_token_ids(list(req.stop_token_ids or []), "stop_token_ids", vocab_size),
        ignore_eos=req.ignore_eos,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def check_n(n: int, cfg: RouterConfig) -> int:
    return check_int(n, "n", 1, cfg.max_n, 1)


def text_options(req: SamplingFields) -> TextOptions:
    return TextOptions(stop=check_stop(req.stop), include_stop_str=req.include_stop_str_in_output,
                       skip_special_tokens=req.skip_special_tokens)


def check_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> plain dicts for the chat template; 400 on roles / parts we cannot serve."""
    if not messages:
        raise bad("messages must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise bad(f"unknown role {m.role!r} in {where}; expected one of {sorted(ROLES)}",
                      param=f"{where}.role")
        content = _check_content(m.content, f"{where}.content")
        if m.role == "tool" and content is None:
            raise bad(f"{where}: a tool message needs content", param=f"{where}.content")
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            if m.role != "assistant":
                raise bad(f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
            msg["tool_calls"] = _check_tool_calls(m.tool_calls, f"{where}.tool_calls")
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def _check_content(content, where: str) -> str | None:
    """A string, None, or a list of text parts (joined); image / audio / file parts -> 400."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{where}[{j}] must be an object with a 'type'", param=f"{where}[{j}]")
        if part["type"] != "text":
            raise bad(f"{where}[{j}]: content part type {part['type']!r} is not supported (text only)",
                      param=f"{where}[{j}].type", code="unsupported_content")
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _check_tool_calls(calls: list[dict], where: str) -> list[dict]:
    for j, call in enumerate(calls):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}[{j}].function.name must be a string", param=f"{where}[{j}].function")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise bad(f"{where}[{j}].function.arguments must be a JSON string", param=f"{where}[{j}].function")
    return calls
