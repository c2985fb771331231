"""POST /v1/completions (OpenAI legacy completions, plus vLLM's `return_token_ids`).

Runs in the router process. `prompt` is a string, a list of strings, a list of token ids or
a list of lists of token ids; each prompt gets `n` choices (index = prompt * n + i). With a
seed, choice i samples with seed + i. Logprobs use the completions shape (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`).
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from glmserve.router import validate as V
from glmserve.router.errors import APIError, bad
from glmserve.router.generation import Delta, merged, start_choices
from glmserve.router.http_common import (collect, decode_json, error_event, json_response, new_id, off_loop, read_body,
                                         sse, sse_response)
from glmserve.router.schemas import CompletionRequest
from glmserve.router.state import RouterState


def prompt_ids(req: CompletionRequest, st: RouterState) -> list[list[int]]:
    """Token ids of every prompt; 400 on empty prompts or ids outside the vocabulary."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif not p:
        raise bad("prompt must not be empty", param="prompt")
    elif all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif all(type(x) is int for x in p):
        prompts = [p]
    elif all(isinstance(x, list) for x in p):
        prompts = list(p)
    else:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                  "of token ids", param="prompt")
    if len(prompts) > st.cfg.max_n:
        raise bad(f"at most {st.cfg.max_n} prompts per request", param="prompt")
    out = []
    for x in prompts:
        ids = st.tokenizer.encode(x) if isinstance(x, str) else V.check_token_ids(x, "prompt", st.vocab_size)
        if not ids:
            raise bad("prompt must not be empty", param="prompt")
        out.append(ids)
    return out


def _plan(req: CompletionRequest, st: RouterState):
    prompts = prompt_ids(req, st)
    n = V.check_n(req.n, st.cfg)
    if len(prompts) * n > st.cfg.max_n:
        raise bad(f"prompts x n must be at most {st.cfg.max_n}", param="n")
    if req.suffix:
        raise bad("suffix is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise bad("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    if req.best_of is not None and req.best_of != n:
        raise bad("best_of must equal n (best-of sampling is not supported)", param="best_of")
    top = V.check_int(req.logprobs, "logprobs", 0, st.cfg.max_top_logprobs, 0)
    longest = max(len(p) for p in prompts)
    max_tokens = V.check_max_tokens(req.max_tokens, longest, st.cfg, "max_tokens", st.cfg.max_new_tokens_default)
    base = V.sampling_params(req, max_tokens, st.vocab_size, st.cfg, req.logprobs is not None, top)
    opts = V.text_options(req)

    def sampling_of(i: int):
        return base if base.seed is None else msgspec.structs.replace(base, seed=base.seed + i)

    return prompts, n, sampling_of, opts


def _echo_texts(req: CompletionRequest, st: RouterState, prompts: list[list[int]]) -> list[str]:
    """Per prompt, the text `echo` puts before the completion ("" without echo)."""
    if not req.echo:
        return [""] * len(prompts)
    if isinstance(req.prompt, str):
        return [req.prompt]
    return [x if isinstance(x, str) else st.tokenizer.decode(p) for x, p in zip(_as_list(req.prompt), prompts)]


def _as_list(prompt) -> list:
    return [prompt] if prompt and type(prompt[0]) is int else list(prompt)


def _logprobs_obj(st: RouterState, deltas: list[Delta], offset0: int) -> dict:
    tokens, lps, tops, offsets, off = [], [], [], [], offset0
    for d in deltas:
        for k, tid in enumerate(d.token_ids):
            text = st.tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append(text)
            lps.append(d.logprobs[k] if k < len(d.logprobs) else None)
            top = d.top_logprobs[k] if k < len(d.top_logprobs) else []
            tops.append({st.tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in top})
            offsets.append(off)
            off += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def completions(request: Request) -> Response:
    st: RouterState = request.app.state.router
    req = decode_json(await read_body(request, st.cfg.max_body_bytes, st.cfg.body_timeout_s), CompletionRequest)
    prompts, n, sampling_of, opts = await off_loop(_plan, req, st)
    rid = new_id("cmpl")
    streams = start_choices(st.dispatcher, st.metrics, st.tokenizer, rid, prompts, sampling_of, n, opts)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.cfg.served_model_name}
    if req.stream:
        return sse_response(_stream(st, req, head, streams, prompts, n))
    per_choice = await collect(request, streams)
    echo = _echo_texts(req, st, prompts)
    choices, completion_tokens = [], 0
    for k, deltas in enumerate(per_choice):
        ids = [t for d in deltas for t in d.token_ids]
        completion_tokens += len(ids)
        c = {"index": k, "text": echo[k // n] + "".join(d.text for d in deltas),
             "finish_reason": deltas[-1].finish_reason,
             "logprobs": _logprobs_obj(st, deltas, 0) if req.logprobs is not None else None}
        if req.return_token_ids:
            c["token_ids"] = ids
            c["prompt_token_ids"] = prompts[k // n]
        choices.append(c)
    prompt_tokens = sum(len(p) for p in prompts) * n
    body = {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}
    if req.return_token_ids:
        body["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
    return json_response(body)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(st: RouterState, req: CompletionRequest, head: dict, streams, prompts, n):
    completion_tokens, sent_prompt, echo = 0, set(), _echo_texts(req, st, prompts)
    try:
        async for d in merged(streams):
            completion_tokens += len(d.token_ids)
            first = d.index not in sent_prompt
            sent_prompt.add(d.index)
            c = {"index": d.index, "text": (echo[d.index // n] if first else "") + d.text,
                 "finish_reason": d.finish_reason,
                 "logprobs": _logprobs_obj(st, [d], 0) if req.logprobs is not None else None}
            if req.return_token_ids:
                c["token_ids"] = d.token_ids
                if first:
                    c["prompt_token_ids"] = prompts[d.index // n]
            yield sse({**head, "choices": [c]})
    except APIError as e:
        yield error_event(e)
        yield sse("[DONE]")
        return
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = _usage(sum(len(p) for p in prompts) * n, completion_tokens)
        yield sse({**head, "choices": [], "usage": usage})
    yield sse("[DONE]")
