"""A small OpenAI-compatible streaming server with known timings, run as its own process by the bench tests.

It answers /v1/completions, /v1/chat/completions (SSE, role chunk first, usage last), LightLLM's
/generate and /generate_stream, /v1/models and a Prometheus /metrics whose KV-transfer, pages,
queue and MTP series move with every request, so the tool's client timing, token counting and
server-metric deltas are checked against values fixed here:
first token after FIRST_S, then one token every GAP_S; output length = max_tokens. Model
"silent-model": every token's text is "" (ids a tokenizer does not know, as with dummy weights);
"failing-model": two tokens, then an error payload ends the stream.

    python tests/bench/timed_server.py PORT
"""

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

FIRST_S = 0.05
GAP_S = 0.01
STATE = {"requests": 0, "tokens": 0}


def _max_tokens(body: dict) -> int:
    params = body.get("parameters") or {}
    return int(body.get("max_tokens") or body.get("max_completion_tokens") or params.get("max_new_tokens") or 16)


def _prompt_len(body: dict) -> int:
    p = body.get("prompt") or body.get("inputs") or (body.get("messages") or [{}])[-1].get("content", "")
    return len(p) if isinstance(p, list) else len(str(p).split())


async def _events(body: dict, chat: bool, lightllm: bool):
    n, STATE["requests"] = _max_tokens(body), STATE["requests"] + 1
    tok = "" if body.get("model") == "silent-model" else " tok"
    if chat:
        yield {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    for i in range(n):
        await asyncio.sleep(FIRST_S if i == 0 else GAP_S)
        STATE["tokens"] += 1
        if body.get("model") == "failing-model" and i == 2:  # the server fails the request mid-stream
            yield {"error": {"message": "KV transfer to d0 failed", "type": "server_error", "param": None, "code": 503}}
            return
        if lightllm:
            yield {"token": {"id": 7, "text": tok}, "finished": i == n - 1}
        else:
            yield {"choices": [{"index": 0, "delta": {"content": tok}} if chat else {"index": 0, "text": tok}]}
    if not lightllm:
        yield {"choices": [{"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}]}
        yield {"choices": [], "usage": {"prompt_tokens": _prompt_len(body), "completion_tokens": n}}


def _sse(body: dict, chat: bool = False, lightllm: bool = False) -> StreamingResponse:
    async def gen():
        async for ev in _events(body, chat, lightllm):
            yield f"data: {json.dumps(ev)}\n\n"
        if not lightllm:
            yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream")


async def completions(request: Request):
    body = await request.json()
    if body.get("max_tokens") == 999:
        return JSONResponse({"error": "too long"}, status_code=400)
    return _sse(body)


async def chat(request: Request):
    return _sse(await request.json(), chat=True)


async def generate_stream(request: Request):
    return _sse(await request.json(), lightllm=True)


async def generate(request: Request):
    body = await request.json()
    n = _max_tokens(body)
    await asyncio.sleep(FIRST_S + GAP_S * (n - 1))
    STATE["requests"] += 1
    return JSONResponse({"generated_text": [" tok" * n], "count_output_tokens": n, "finish_reason": "length"})


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "timed-model", "object": "model"}]})


async def metrics(request: Request):
    r, t = STATE["requests"], STATE["tokens"]
    return PlainTextResponse(
        f"# TYPE glm_kv_transfer_bytes_total counter\nglm_kv_transfer_bytes_total {r * 2e9}\n"
        f"# TYPE glm_kv_transfer_seconds_total counter\nglm_kv_transfer_seconds_total {r * 0.5}\n"
        f"# TYPE glm_kv_pages_used gauge\nglm_kv_pages_used{{worker=\"d0\"}} 12\n"
        f"# TYPE glm_prefill_queue_tokens gauge\nglm_prefill_queue_tokens 3\n"
        f"# TYPE glm_mtp_draft_tokens_total counter\nglm_mtp_draft_tokens_total {t * 2}\n"
        f"# TYPE glm_mtp_accepted_tokens_total counter\nglm_mtp_accepted_tokens_total {t}\n")


app = Starlette(routes=[
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat, methods=["POST"]),
    Route("/generate", generate, methods=["POST"]),
    Route("/generate_stream", generate_stream, methods=["POST"]),
    Route("/v1/models", models), Route("/metrics", metrics),
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
