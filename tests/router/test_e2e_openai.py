"""The router in the real CPU fleet (tests/e2e/fleet.py: router + prefill + decode processes,
ZeroMQ, gloo KV link, tiny GLM-4.7-Flash-shaped model) with the official openai client:
chat and completions, streaming and not, n > 1 with seeds, logprobs, stop strings, tools and
reasoning options, /health_generate, and KV pages back to zero afterwards."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

try:  # the workers part's fleet starter (tests/ is on sys.path through tests/conftest.py)
    from e2e.conftest import _write_model
    from e2e.fleet import start_fleet
except ImportError:  # tests/ became a package
    from tests.e2e.conftest import _write_model
    from tests.e2e.fleet import start_fleet

pytestmark = pytest.mark.slow
ROUTER_ARGS = ("--tool_call_parser", "glm47", "--reasoning_parser", "glm45", "--max_req_total_len", "512",
               "--max_queue", "4")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    model_dir = _write_model(str(tmp_path_factory.mktemp("router_e2e_model")), "glm4_moe_lite")
    f = start_fleet(model_dir, str(tmp_path_factory.mktemp("router_e2e_logs")), router_args=ROUTER_ARGS)
    yield f, openai.OpenAI(base_url=f.base_url + "/v1", api_key="x", timeout=60, max_retries=0)
    f.stop()


def _pages_back_to_zero(fleet, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        used = {w: fleet.metric(w, "glm_worker_kv_pages_used") for w in fleet.health_ports}
        if not any(used.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert not any(used.values()), f"KV pages still used: {used}"


def test_completions_stream_equals_non_stream(e2e):
    fleet, client = e2e
    kw = dict(model="x", prompt="The capital of France is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kw)
    ids = full.choices[0].model_extra["token_ids"]
    assert len(ids) == 8 and full.usage.completion_tokens == 8
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == ids
    assert chunks[-1].usage.completion_tokens == 8
    _pages_back_to_zero(fleet)


def test_chat_n_seeds_logprobs(e2e):
    fleet, client = e2e
    msgs = [{"role": "user", "content": "Say something."}]
    kw = dict(model="x", messages=msgs, max_tokens=6, temperature=1.0, seed=123, n=3, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and a.usage.completion_tokens == 18
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # same seed -> same output
    for c in a.choices:
        assert len(c.logprobs.content) == 6
        assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in c.logprobs.content)
    one = client.chat.completions.create(**{**kw, "n": 1, "seed": 124})
    assert one.choices[0].message.content == texts[1]  # choice i samples with seed + i
    _pages_back_to_zero(fleet)


def test_stop_string_and_streaming_chat(e2e):
    fleet, client = e2e
    kw = dict(model="x", prompt="abc", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[3:5] if len(text) >= 5 and text[3:5].strip() else None
    if stop:
        r = client.completions.create(**kw, stop=[stop])
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.index(stop)]
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "tool_calls", "stop")
    _pages_back_to_zero(fleet)


def test_health_generate_and_metrics(e2e):
    fleet, _ = e2e
    r = httpx.get(fleet.base_url + "/health_generate", timeout=60)
    assert r.status_code == 200 and r.json()["tokens"] == 1
    m = httpx.get(fleet.base_url + "/metrics").text
    assert 'router_requests_total{endpoint="/v1/completions",status="200"}' in m
    assert "router_time_to_first_token_seconds_count" in m
    assert httpx.get(fleet.base_url + "/readyz").status_code == 200


def test_aborted_streams_free_every_page(e2e):
    """200 streams cut at random points, 8 at a time (client disconnect -> router Abort to both
    workers, in every phase: queued, reserving, prefilling, decoding)."""
    fleet, _ = e2e
    rng = random.Random(0)
    codes: list[int] = []

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, cut: int) -> None:
        body = {"model": "x", "prompt": "tell me a story " * rng.randint(1, 8), "max_tokens": 24,
                "stream": True, "ignore_eos": True}
        async with gate, client.stream("POST", "/v1/completions", json=body) as r:
            codes.append(r.status_code)
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen >= cut:
                    break

    async def storm() -> None:
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=fleet.base_url, timeout=60) as client:
            await asyncio.gather(*[one(client, gate, rng.randint(0, 20)) for _ in range(200)])

    asyncio.run(storm())
    assert codes.count(200) >= 150, codes.count(200)  # the rest may be 429 (--max_queue 4), never 5xx
    assert all(c in (200, 429) for c in codes)
    _pages_back_to_zero(fleet, timeout_s=15)
    r = httpx.post(fleet.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_overload_answers_429_and_keeps_serving(e2e):
    """Far more concurrent long requests than the decode's pages hold: the router queues up to
    --max_queue (4) and answers 429 with Retry-After beyond it; every other request completes."""
    fleet, _ = e2e

    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json={"prompt": "word " * 100, "max_tokens": 100,
                                                       "ignore_eos": True})
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
        return r.status_code, time.monotonic() - t0

    async def burst() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=fleet.base_url, timeout=120) as client:
            return await asyncio.gather(*[one(client) for _ in range(40)])

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert codes.count(429) > 0 and codes.count(200) > 0, codes
    assert max(t for c, t in results if c == 200) < 30  # served requests still finish promptly
    assert max(t for c, t in results if c == 429) < 5  # rejections are immediate, not timeouts
    _pages_back_to_zero(fleet, timeout_s=15)
    assert httpx.get(fleet.base_url + "/readyz").status_code == 200
