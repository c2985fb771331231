"""Issue 4, overload: a burst of 6x the CPU fleet's capacity at once (real router + prefill + decode).

Capacity C = requests the decode can hold at once = min(--max_running, free KV pages // pages one request
reserves), read from the decode's /metrics at idle (344 free pages of 4 tokens, 12-token prompts + 160 new
tokens = 43 pages each -> C = 8). The router queues up to --max_queue (= C) runs beyond that; the rest get 429.
Stated latency: every served request completes (160 tokens) within 20 s of being sent (measured: p50 2.0 s,
p99 2.0 s on the 2-core box), and every 429 comes back within 2 s (measured max 0.12 s: an immediate
rejection, not a timeout). The decode's running count (sampled at its 0.5 s heartbeats) never exceeds C
and reaches at least C / 2. Also: no 5xx, every 429 carries Retry-After and an OpenAI error body, no
process dies, pages return to zero, the fleet answers afterwards.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time

import httpx
import pytest

try:
    from tests.e2e.conftest import _write_model
    from tests.e2e.fleet import start_fleet
except ImportError:  # tests/ not importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from e2e.conftest import _write_model
    from e2e.fleet import start_fleet

pytestmark = pytest.mark.slow
PAGE, NUM_PAGES, PROMPT_LEN, NEW_TOKENS = 4, 345, 12, 160
SERVED_E2E_LIMIT_S, REJECT_LIMIT_S = 20.0, 2.0


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory):
    model_dir = _write_model(str(tmp_path_factory.mktemp("overload_model")), "glm4_moe_lite")
    fleet = start_fleet(model_dir, str(tmp_path_factory.mktemp("overload_logs")), page_size=PAGE,
                        num_pages=NUM_PAGES, router_args=("--max_queue", "8"))
    yield fleet
    fleet.stop()


def capacity(fleet) -> int:
    free = fleet.metric("d0", "glm_worker_kv_pages_free")
    per_request = math.ceil((PROMPT_LEN + NEW_TOKENS) / PAGE)
    return min(64, int(free) // per_request)  # 64 = the decode's default --max_running


def _peak_watch(fleet, stop: threading.Event, peak: dict) -> None:
    while not stop.is_set():
        for name in ("glm_worker_running_requests", "glm_worker_kv_pages_used"):
            peak[name] = max(peak.get(name, 0.0), fleet.metric("d0", name))
        time.sleep(0.05)


async def _one(client: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Response]:
    prompt = [3 + (7 * i + j) % 900 for j in range(PROMPT_LEN)]
    t0 = time.monotonic()
    r = await client.post("/v1/completions", json={"model": "x", "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                   "ignore_eos": True, "temperature": 0})
    return r.status_code, time.monotonic() - t0, r


async def _burst(url: str, n: int) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*[_one(client, i) for i in range(n)])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def test_burst_at_6x_capacity(small_fleet):
    fleet = small_fleet
    cap = capacity(fleet)
    assert cap == 8
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=_peak_watch, args=(fleet, stop, peak), daemon=True)
    watcher.start()
    results = asyncio.run(_burst(fleet.base_url, 6 * cap))
    stop.set()
    watcher.join()
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429}, codes  # never a 5xx
    served = [t for c, t, _ in results if c == 200]
    rejected = [(t, r) for c, t, r in results if c == 429]
    print(f"capacity {cap}, sent {len(results)}, served {len(served)}, 429 {len(rejected)}, "
          f"served e2e p50 {_pct(served, 0.5):.2f}s p99 {_pct(served, 0.99):.2f}s, "
          f"429 max {max(t for t, _ in rejected):.2f}s, peak {peak}")
    assert len(served) >= cap and len(rejected) >= 2 * cap  # the fleet was full and shed the excess
    assert max(served) < SERVED_E2E_LIMIT_S
    for t, r in rejected:
        assert t < REJECT_LIMIT_S and r.headers["retry-after"].isdigit()
        assert r.json()["error"]["type"] == "rate_limit_error"
    for _, _, r in results:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS
    assert cap // 2 <= peak["glm_worker_running_requests"] <= cap  # full, never more than it can hold
    assert peak["glm_worker_kv_pages_used"] <= NUM_PAGES - 1
    assert all(p.poll() is None for p in fleet.procs.values())
    _pages_zero_and_serving(fleet)


def _pages_zero_and_serving(fleet) -> None:
    deadline = time.monotonic() + 15
    while any(fleet.metric(w, "glm_worker_kv_pages_used") for w in fleet.health_ports):
        assert time.monotonic() < deadline, "KV pages not back to zero after the burst"
        time.sleep(0.25)
    r = httpx.post(fleet.base_url + "/v1/completions", json={"prompt": "again", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert 'router_requests_total{endpoint="/v1/completions",status="429"}' in httpx.get(fleet.base_url + "/metrics").text


async def _one_stream(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
    prompt = [5 + (11 * i + j) % 900 for j in range(PROMPT_LEN)]
    body = {"model": "x", "prompt": prompt, "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        return r.status_code, (await r.aread()).decode()


def test_streaming_burst_gets_429_as_the_status_never_mid_stream(small_fleet):
    """The queue bound counts runs awaiting a decode's reservation, and is checked only at admission:
    a streamed request either gets the 429 status or a whole stream (no error event, no early end)."""
    fleet = small_fleet
    cap = capacity(fleet)

    async def burst():
        limits = httpx.Limits(max_connections=6 * cap, max_keepalive_connections=6 * cap)
        async with httpx.AsyncClient(base_url=fleet.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*[_one_stream(client, i) for i in range(6 * cap)])

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert set(codes) == {200, 429}, codes
    for code, text in results:
        if code == 200:
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-500:]
            assert text.count('"finish_reason":"length"') == 1
    _pages_zero_and_serving(fleet)
