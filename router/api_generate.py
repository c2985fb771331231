"""LightLLM's POST /generate and POST /generate_stream.

Runs in the router process. Body: `{"inputs": str, "parameters": {max_new_tokens, temperature,
top_p, top_k, frequency_penalty, presence_penalty, repetition_penalty, stop, ignore_eos,
do_sample, seed}}`; `do_sample: false` (LightLLM's default) means greedy. Response like
LightLLM's: `{"generated_text": [text], "count_output_tokens", "finish_reason", "prompt_tokens"}`;
the stream sends `data: {"token": {"id", "text", "logprob", "special"}, "generated_text",
"finished", "finish_reason", "details"}` per token.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from glmserve.router import validate as V
from glmserve.router.errors import APIError, bad
from glmserve.router.generation import merged, start_choices
from glmserve.router.http_common import (collect, decode_json, error_event, json_response, new_id, off_loop, read_body,
                                         sse, sse_response)
from glmserve.router.schemas import GenerateRequest, SamplingFields
from glmserve.router.state import RouterState


def _plan(req: GenerateRequest, st: RouterState):
    if not req.inputs:
        raise bad("inputs must not be empty", param="inputs")
    prompt = st.tokenizer.encode(req.inputs)
    p = req.parameters
    max_new = V.check_max_tokens(p.max_new_tokens, len(prompt), st.cfg, "parameters.max_new_tokens", 16)
    if p.stop is not None and p.stop_sequences is not None:
        raise bad("give stop or stop_sequences, not both", param="parameters.stop")
    V.check_float(p.temperature, "parameters.temperature", 0.0, 100.0, 1.0)  # checked even when greedy
    fields = SamplingFields(
        temperature=p.temperature if p.do_sample else 0.0, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty, ignore_eos=p.ignore_eos, seed=p.seed,
        stop=p.stop if p.stop is not None else p.stop_sequences, skip_special_tokens=p.skip_special_tokens)
    try:
        sampling = V.sampling_params(fields, max_new, st.vocab_size, st.cfg, False, 0)
        opts = V.text_options(fields)
    except APIError as e:  # name the field the way this endpoint spells it
        e.param = f"parameters.{e.param}" if e.param else None
        raise
    return prompt, sampling, opts


async def _start(request: Request):
    st: RouterState = request.app.state.router
    req = decode_json(await read_body(request, st.cfg.max_body_bytes, st.cfg.body_timeout_s), GenerateRequest)
    prompt, sampling, opts = await off_loop(_plan, req, st)
    streams = start_choices(st.dispatcher, st.metrics, st.tokenizer, new_id("gen"), [prompt],
                            lambda i: sampling, 1, opts)
    return st, req, prompt, streams


async def generate(request: Request) -> Response:
    st, req, prompt, streams = await _start(request)
    if req.stream:
        return sse_response(_stream(st, streams))
    deltas = (await collect(request, streams))[0]
    return json_response({
        "generated_text": ["".join(d.text for d in deltas)],
        "count_output_tokens": sum(len(d.token_ids) for d in deltas),
        "finish_reason": deltas[-1].finish_reason,
        "prompt_tokens": len(prompt),
    })


async def generate_stream(request: Request) -> Response:
    st, _, _, streams = await _start(request)
    return sse_response(_stream(st, streams))


async def _stream(st: RouterState, streams):
    text, count = "", 0
    try:
        async for d in merged(streams):
            text += d.text
            count += len(d.token_ids)
            finished = d.finish_reason is not None
            yield sse({
                "token": {"id": d.token_ids[-1] if d.token_ids else None, "text": d.text,
                          "logprob": d.logprobs[-1] if d.logprobs else None, "special": False,
                          "count_output_tokens": count},
                "generated_text": text if finished else None,
                "finished": finished,
                "finish_reason": d.finish_reason,
                "details": None,
            })
    except APIError as e:
        yield error_event(e)
