"""One streamed request to an OpenAI-compatible (or LightLLM) server, timed as `vllm bench serve` does.

Runs in the benchmark client's asyncio loop. A "token chunk" is an SSE event whose first choice
carries non-empty text (`text`, `delta.content` or `delta.reasoning_content`) or token ids;
role-only and finish-only events are not tokens. TTFT = send -> first token chunk; ITL = the
gaps between consecutive token chunks; latency (E2E) = send -> last token chunk, so that
latency == ttft + sum(itl). Output tokens come from the server's `usage` when it sends one,
else from the client's token counter; the prompt length too (`usage.prompt_tokens`, which for chat
includes the chat template's tokens), else the dataset's count.
`/generate` (LightLLM, not streamed) has no first-token time: TTFT = E2E there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from bench.sharegpt.datasets import SampleRequest
from bench.sharegpt.text import TokenCounter

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream")


@dataclass(frozen=True)
class RequestConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str = "default"
    ignore_eos: bool = False
    temperature: float = 0.0
    send_ids: bool = True  # send token-id prompts to /v1/completions when the dataset made ids
    extra_body: tuple[tuple[str, object], ...] = ()


@dataclass
class RequestOutput:
    """Client-side record of one request (seconds, perf_counter clock)."""

    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_len: int = 0
    generated_text: str = ""
    error: str = ""


def build_payload(cfg: RequestConfig, req: SampleRequest) -> dict:
    common = {"model": cfg.model, "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "/v1/completions":
        prompt = list(req.prompt_ids) if (cfg.send_ids and req.prompt_ids) else req.prompt
        body = {**common, "prompt": prompt, "max_tokens": req.expected_output_len, "stream": True,
                "stream_options": {"include_usage": True}}
    elif cfg.endpoint == "/v1/chat/completions":
        body = {**common, "messages": [{"role": "user", "content": req.prompt}],
                "max_completion_tokens": req.expected_output_len, "stream": True,
                "stream_options": {"include_usage": True}}
    else:  # LightLLM /generate and /generate_stream
        body = {"inputs": req.prompt, "parameters": {
            "max_new_tokens": req.expected_output_len, "ignore_eos": cfg.ignore_eos,
            "do_sample": cfg.temperature > 0, "temperature": cfg.temperature or 1.0}}
    body.update(dict(cfg.extra_body))
    return body


def _chunk_text(data: dict) -> tuple[bool, str, int | None]:
    """(is a token chunk, its text, completion_tokens from usage if present) of one SSE event."""
    usage = data.get("usage") or {}
    n_out = usage.get("completion_tokens")
    if "token" in data:  # LightLLM / TGI generate_stream event
        token = data.get("token") or {}
        n = token.get("count_output_tokens") or (data.get("details") or {}).get("generated_tokens")
        return bool(token.get("text")) or token.get("id") is not None, token.get("text") or "", n or n_out
    choices = data.get("choices") or []
    if not choices:
        return False, "", n_out
    c0 = choices[0]
    delta = c0.get("delta") or {}
    text = c0.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    # a completions chunk before the last is a token chunk even when its text is empty (ids the
    # tokenizer does not know, a held-back partial UTF-8 character), as vLLM's client counts it; a
    # chat chunk needs content, a tool call or ids (the opening role-only chunk and finish-only
    # chunks are not tokens)
    is_tok = (bool(text) or bool(c0.get("token_ids")) or bool(delta.get("tool_calls"))
              or ("text" in c0 and c0.get("finish_reason") is None))
    return is_tok, text, n_out


async def _stream(client: httpx.AsyncClient, url: str, body: dict, out: RequestOutput, st: float) -> int | None:
    n_out = None
    last = st
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            return None
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            if isinstance(data.get("error"), dict):  # the server failed the request mid-stream
                out.error = f"stream error: {str(data['error'].get('message'))[:300]}"
                break
            is_tok, text, usage_out = _chunk_text(data)
            n_out = usage_out if usage_out is not None else n_out
            out.prompt_len = (data.get("usage") or {}).get("prompt_tokens") or out.prompt_len
            if not is_tok:
                continue
            now = time.perf_counter()
            if out.ttft == 0.0:
                out.ttft = now - st
            else:
                out.itl.append(now - last)
            last = now
            out.generated_text += text
    out.latency = last - st
    out.success = out.ttft > 0.0 and not out.error
    if not out.success and not out.error:
        out.error = "Never received a valid chunk to calculate TTFT."
    return n_out


async def _unary(client: httpx.AsyncClient, url: str, body: dict, out: RequestOutput, st: float) -> int | None:
    resp = await client.post(url, json=body)
    now = time.perf_counter()
    if resp.status_code != 200:
        out.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
        return None
    data = resp.json()
    text = data.get("generated_text", "")
    out.generated_text = text[0] if isinstance(text, list) and text else str(text)
    out.ttft = out.latency = now - st
    out.success = True
    out.prompt_len = data.get("prompt_tokens") or out.prompt_len
    n = data.get("count_output_tokens")
    return int(n[0] if isinstance(n, list) else n) if n is not None else None


async def send_request(
    client: httpx.AsyncClient, cfg: RequestConfig, req: SampleRequest, counter: TokenCounter,
) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len)
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    body = build_payload(cfg, req)
    st = out.start_time = time.perf_counter()
    try:
        run = _unary if cfg.endpoint == "/generate" else _stream
        n_out = await run(client, url, body, out, st)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        out.success, out.error = False, f"{type(exc).__name__}: {exc}"
        return out
    if out.success:
        out.output_tokens = n_out if n_out is not None else counter.count(out.generated_text)
    return out
