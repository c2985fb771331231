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

from router import validate as V
from router.chat_output import ParsedDelta, make_parser
from router.errors import APIError, bad
from router.generation import Delta, merged, start_choices
from router.http_common import collect, decode_json, error_event, json_response, new_id, read_body, sse, sse_response
from router.schemas import ChatRequest
from router.state import RouterState

_RESERVED_KWARGS = {"messages", "tools", "add_generation_prompt", "documents"}


def render_prompt(req: ChatRequest, st: RouterState) -> tuple[list[int], list[dict] | None, bool]:
    """Prompt token ids, the tools as dicts (None without tools) and whether thinking is on."""
    messages = V.check_messages(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if _RESERVED_KWARGS & kwargs.keys():
        raise bad(f"chat_template_kwargs must not set {sorted(_RESERVED_KWARGS & kwargs.keys())}",
                  param="chat_template_kwargs")
    tools = [msgspec.to_builtins(t) for t in req.tools] if req.tools else None
    if tools and any(t["type"] != "function" for t in tools):
        raise bad("only tools of type 'function' are supported", param="tools")
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise bad(f"tool_choice must be 'auto', 'none' or 'required', got {choice!r}", param="tool_choice")
    if choice == "required" or isinstance(choice, dict):
        raise bad("tool_choice 'required' and named tool choice are not supported", param="tool_choice")
    if choice == "none":
        tools = None
    try:
        text = st.tokenizer.apply_chat_template(messages, tools=tools,
                                                add_generation_prompt=req.add_generation_prompt, **kwargs)
    except APIError:
        raise
    except Exception as e:  # template errors (raise_exception, bad tool-call arguments) are the client's
        raise bad(f"cannot render the chat template: {e}", param="messages") from None
    return st.tokenizer.encode(text), tools, bool(kwargs.get("enable_thinking", True))


def _plan(req: ChatRequest, st: RouterState):
    prompt, tools, thinking = render_prompt(req, st)
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

    return prompt, tools, thinking, n, sampling_of, opts


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


def _merge_calls(calls: list[dict], parts: list[dict]) -> None:
    """Accumulate streaming tool-call deltas into whole calls (by index)."""
    for p in parts:
        i = p.get("index", len(calls))
        while len(calls) <= i:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        c, fn = calls[i], p.get("function") or {}
        c["id"] = p.get("id") or c["id"] or f"call_{i}"
        c["function"]["name"] += fn.get("name") or ""
        c["function"]["arguments"] += fn.get("arguments") or ""


def _parsers(req: ChatRequest, st: RouterState, tools, thinking: bool, count: int) -> list:
    return [make_parser(st.cfg.tool_call_parser, st.cfg.reasoning_parser, tools, thinking, st.tokenizer)
            for _ in range(count)]


async def chat_completions(request: Request) -> Response:
    st: RouterState = request.app.state.router
    req = decode_json(await read_body(request, st.cfg.max_body_bytes), ChatRequest)
    prompt, tools, thinking, n, sampling_of, opts = _plan(req, st)
    rid = new_id("chatcmpl")
    streams = start_choices(st.dispatcher, st.metrics, st.tokenizer, rid, [prompt], sampling_of, n, opts)
    parsers = _parsers(req, st, tools, thinking, n)
    head = {"id": rid, "created": int(time.time()), "model": st.cfg.served_model_name}
    if req.stream:
        return sse_response(_stream(st, req, head, streams, parsers, len(prompt)))
    per_choice = await collect(request, streams)
    choices, completion_tokens = [], 0
    for k, deltas in enumerate(per_choice):
        completion_tokens += sum(len(d.token_ids) for d in deltas)
        parsed = [parsers[k].feed(d.text) for d in deltas] + [parsers[k].finish()]
        calls: list[dict] = []
        for p in parsed:
            _merge_calls(calls, p.tool_calls)
        msg = {"role": "assistant", "content": "".join(p.content for p in parsed) or (None if calls else "")}
        reasoning = "".join(p.reasoning for p in parsed)
        if reasoning:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        reason = "tool_calls" if calls and deltas[-1].finish_reason == "stop" else deltas[-1].finish_reason
        lps = {"content": [e for d in deltas for e in _logprobs(st, d)]} if req.logprobs else None
        choices.append({"index": k, "message": msg, "logprobs": lps, "finish_reason": reason})
    usage = {"prompt_tokens": len(prompt) * n, "completion_tokens": completion_tokens,
             "total_tokens": len(prompt) * n + completion_tokens}
    return json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage})


def _delta_dict(p: ParsedDelta) -> dict:
    delta: dict = {}
    if p.content:
        delta["content"] = p.content
    if p.reasoning:
        delta["reasoning_content"] = p.reasoning
    if p.tool_calls:
        delta["tool_calls"] = p.tool_calls
    return delta


async def _stream(st: RouterState, req: ChatRequest, head: dict, streams, parsers, prompt_len: int):
    head = {**head, "object": "chat.completion.chunk"}
    completion_tokens, had_calls = 0, [False] * len(parsers)
    for k in range(len(parsers)):
        yield sse({**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    try:
        async for d in merged(streams):
            completion_tokens += len(d.token_ids)
            p = parsers[d.index].feed(d.text)
            if d.finish_reason is not None:
                tail = parsers[d.index].finish()
                p = ParsedDelta(p.content + tail.content, p.reasoning + tail.reasoning, p.tool_calls + tail.tool_calls)
            had_calls[d.index] |= bool(p.tool_calls)
            reason = d.finish_reason
            if reason == "stop" and had_calls[d.index]:
                reason = "tool_calls"
            delta = _delta_dict(p)
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
