"""The streamed client against a real HTTP server with known timings: TTFT, ITL, E2E, token counts, errors."""

import asyncio

import httpx
import pytest

from bench.sharegpt.client import RequestConfig, send_request
from bench.sharegpt.datasets import SampleRequest
from bench.sharegpt.text import TokenCounter

FIRST_S, GAP_S = 0.05, 0.01  # tests/bench/timed_server.py


def _send(url: str, endpoint: str, max_tokens: int, ids=None, model: str = "timed-model"):
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            cfg = RequestConfig(url, endpoint, model, ignore_eos=True)
            req = SampleRequest("a b c d e f", 6, max_tokens, ids)
            return await send_request(client, cfg, req, TokenCounter())
    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions", "/generate_stream"])
def test_streamed_timings(timed_server, endpoint):
    out = _send(timed_server, endpoint, 6, ids=(5, 6, 7, 8, 9, 10))
    assert out.success, out.error
    assert out.output_tokens == 6
    assert out.generated_text == " tok" * 6
    assert FIRST_S <= out.ttft < FIRST_S + 5.0  # lower bound is hard; upper only sanity (shared CPU)
    assert len(out.itl) == 5  # role-only and finish-only chunks are not tokens
    assert all(0 <= g < 5.0 for g in out.itl)
    assert out.latency >= FIRST_S + 5 * GAP_S * 0.9  # the last token cannot arrive before it is sent
    assert out.latency == pytest.approx(out.ttft + sum(out.itl))
    assert out.prompt_len == 6  # the server's usage.prompt_tokens (the timed server counts words / ids)


def test_tokens_with_empty_text_still_time_the_stream(timed_server):
    """Dummy weights emit ids the tokenizer does not know: every token's text is "". Such chunks are
    still tokens (the first one is the TTFT), else every request fails ("Never received a valid
    chunk") as the first GPU fleet run did."""
    out = _send(timed_server, "/v1/completions", 6, ids=(5, 6, 7, 8, 9, 10), model="silent-model")
    assert out.success, out.error
    assert out.generated_text == ""
    assert FIRST_S <= out.ttft < FIRST_S + 5.0
    assert len(out.itl) == 5  # the finish-only chunk is still not a token
    assert out.output_tokens == 6


def test_server_prompt_count_wins(timed_server):
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            cfg = RequestConfig(timed_server, "/v1/completions", "timed-model", send_ids=False)
            return await send_request(client, cfg, SampleRequest("one two three", 99, 2), TokenCounter())
    assert asyncio.run(go()).prompt_len == 3  # usage.prompt_tokens replaces the dataset's 99


def test_unary_generate(timed_server):
    out = _send(timed_server, "/generate", 4)
    assert out.success and out.output_tokens == 4
    assert out.ttft == out.latency >= FIRST_S + 3 * GAP_S
    assert out.itl == []


def test_http_error_is_a_failed_request(timed_server):
    out = _send(timed_server, "/v1/completions", 999)
    assert not out.success
    assert out.error.startswith("HTTP 400")


def test_error_payload_mid_stream_is_a_failed_request(timed_server):
    """A stream the server ends with an error payload after some tokens is a failure (the first
    one-GPU overlap run counted 43 such requests as successes with no tokens)."""
    out = _send(timed_server, "/v1/completions", 6, model="failing-model")
    assert not out.success
    assert out.error.startswith("stream error: KV transfer to d0 failed")


def test_unreachable_server_is_a_failed_request():
    out = _send("http://127.0.0.1:9", "/v1/completions", 3)
    assert not out.success and "Connect" in out.error
