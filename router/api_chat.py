"""POST /v1/chat/completions.

Runs in the router process. Messages are checked (validate.check_messages), rendered with the
checkpoint's chat template (tools and chat_template_kwargs such as enable_thinking passed
through), tokenized, and dispatched as n runs (choice i seeded seed + i). Output text goes
through the per-choice OutputParser (reasoning_content, tool_calls). Logprobs use the chat
shape (`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`).
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from glmserve.router import validate as V
from glmserve.router.chat_output import make_parser
from glmserve.router.errors import APIError, bad
from glmserve.router.generation import Delta, merged, start_choices
from glmserve.router.parsers import merge_deltas
from glmserve.router.http_common import (collect, decode_json, error_event, json_response, new_id, off_loop, read_body,
                                         sse, sse_response)
from glmserve.router.schemas import ChatRequest
from glmserve.router.state import RouterState
from glmserve.shared.tokenizer.ids_only import NoTokenizerError

_RESERVED_KWARGS = {"messages", "tools", "add_generation_prompt", "documents"}


def render_prompt(req: ChatRequest, st: RouterState) -> tuple[str, list[dict] | None, bool]:
    """Prompt text, the tools as dicts (None without tools) and whether thinking is on."""
    messages = V.check_messages(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if _RESERVED_KWARGS & kwargs.keys():
        raise bad(f"chat_template_kwargs must not set {sorted(_RESERVED_KWARGS & kwargs.keys())}",
                  param="chat_template_kwargs")
    tools = [msgspec.to_builtins(t) for t in req.tools] if req.tools else None
    if tools and any(t["type"] != "function" for t in tools):
        raise bad("only tools of type 'function' are supported", param="tools")
    _check_tool_choice(req.tool_choice, tools)
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise bad("response_format other than {\"type\": \"text\"} is not supported (no guided decoding)",
                  param="response_format")
    if req.tool_choice == "none":
        tools = None
    try:
        text = st.tokenizer.apply_chat_template(messages, tools=tools,
                                                add_generation_prompt=req.add_generation_prompt, **kwargs)
    except NoTokenizerError:
        raise
    except Exception as e:  # template errors (raise_exception, bad tool-call arguments) are the client's
        raise bad(f"cannot render the chat template: {e}", param="messages") from None
    return text, tools, bool(kwargs.get("enable_thinking", True))


def _check_tool_choice(choice, tools: list[dict] | None) -> None:
    if choice is None or choice in ("auto", "none"):
        return
    if isinstance(choice, str):
        if choice != "required":
            raise bad(f"tool_choice must be 'auto', 'none', 'required' or a named tool, got {choice!r}",
                      param="tool_choice")
        if not tools:
            raise bad("tool_choice 'required' needs tools", param="tool_choice")
        return
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad("a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                  param="tool_choice")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise bad(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")


def _plan(req: ChatRequest, st: RouterState):
    prompt_text, tools, thinking = render_prompt(req, st)
    prompt = st.tokenizer.encode(prompt_text)
    n = V.check_n(req.n, st.cfg)
    if req.max_completion_tokens is not None:
        max_tokens = V.check_max_tokens(req.max_completion_tokens, len(prompt), st.cfg, "max_completion_tokens", None)
    else:
        max_tokens = V.check_max_tokens(req.max_tokens, len(prompt), st.cfg, "max_tokens", None)
    top = V.check_int(req.top_logprobs, "top_logprobs", 0, st.cfg.max_top_logprobs, 0)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad("top_logprobs needs logprobs: true", param="top_logprobs")
    base = V.sampling_params(req, max_tokens, st.vocab_size, st.cfg, req.logprobs, top)
    opts = V.text_options(req)

    def sampling_of(i: int):
        return base if base.seed is None else msgspec.structs.replace(base, seed=base.seed + i)

    return prompt, prompt_text, tools, thinking, n, sampling_of, opts


def _logprobs(st: RouterState, d: Delta) -> list[dict]:
    def entry(tid: int, lp: float) -> dict:
        tok = st.tokenizer.decode([tid], skip_special_tokens=False)
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    out = []
    for k, tid in enumerate(d.token_ids):
        e = entry(tid, d.logprobs[k] if k < len(d.logprobs) else 0.0)
        e["top_logprobs"] = [entry(t, lp) for t, lp in (d.top_logprobs[k] if k < len(d.top_logprobs) else [])]
        out.append(e)
    return out


def _parsers(req: ChatRequest, st: RouterState, tools, thinking: bool, prompt_text: str, count: int) -> list:
    return [make_parser(st.cfg, tools, req.tool_choice, thinking, prompt_text) for _ in range(count)]


async def chat_completions(request: Request) -> Response:
    st: RouterState = request.app.state.router
    req = decode_json(await read_body(request, st.cfg.max_body_bytes, st.cfg.body_timeout_s), ChatRequest)
    prompt, prompt_text, tools, thinking, n, sampling_of, opts = await off_loop(_plan, req, st)
    rid = new_id("chatcmpl")
    streams = start_choices(st.dispatcher, st.metrics, st.tokenizer, rid, [prompt], sampling_of, n, opts)
    parsers = _parsers(req, st, tools, thinking, prompt_text, n)
    head = {"id": rid, "created": int(time.time()), "model": st.cfg.served_model_name}
    if req.stream:
        return sse_response(_stream(st, req, head, streams, parsers, len(prompt)))
    per_choice = await collect(request, streams)
    choices, completion_tokens = [], 0
    for k, deltas in enumerate(per_choice):
        completion_tokens += sum(len(d.token_ids) for d in deltas)
        parser = parsers[k]
        msg = merge_deltas([x for d in deltas for x in parser.feed(d.text)] + parser.finish())
        if msg["reasoning_content"] is None:
            del msg["reasoning_content"]
        reason = deltas[-1].finish_reason
        if msg.get("tool_calls") and reason == "stop":
            reason = "tool_calls"
        lps = {"content": [e for d in deltas for e in _logprobs(st, d)]} if req.logprobs else None
        choices.append({"index": k, "message": msg, "logprobs": lps, "finish_reason": reason})
    usage = {"prompt_tokens": len(prompt) * n, "completion_tokens": completion_tokens,
             "total_tokens": len(prompt) * n + completion_tokens}
    return json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage})


def _merge_text(deltas: list[dict]) -> dict:
    """One OpenAI delta from the parser's deltas of one step (text fields joined, calls listed)."""
    out: dict = {}
    for d in deltas:
        for key in ("content", "reasoning_content"):
            if d.get(key):
                out[key] = out.get(key, "") + d[key]
        if d.get("tool_calls"):
            out.setdefault("tool_calls", []).extend(d["tool_calls"])
    return out


async def _stream(st: RouterState, req: ChatRequest, head: dict, streams, parsers, prompt_len: int):
    head = {**head, "object": "chat.completion.chunk"}
    completion_tokens, had_calls = 0, [False] * len(parsers)
    for k in range(len(parsers)):
        yield sse({**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    try:
        async for d in merged(streams):
            completion_tokens += len(d.token_ids)
            parser = parsers[d.index]
            parts = parser.feed(d.text) + (parser.finish() if d.finish_reason is not None else [])
            delta = _merge_text(parts)
            had_calls[d.index] |= "tool_calls" in delta
            reason = d.finish_reason
            if reason == "stop" and had_calls[d.index]:
                reason = "tool_calls"
            if not delta and reason is None and not req.logprobs:
                continue
            lps = {"content": _logprobs(st, d)} if req.logprobs else None
            yield sse({**head, "choices": [{"index": d.index, "delta": delta, "logprobs": lps,
                                            "finish_reason": reason}]})
    except APIError as e:
        yield error_event(e)
        yield sse("[DONE]")
        return
    if req.stream_options is not None and req.stream_options.include_usage:
        n = len(parsers)
        usage = {"prompt_tokens": prompt_len * n, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_len * n + completion_tokens}
        yield sse({**head, "choices": [], "usage": usage})
    yield sse("[DONE]")
