"""The router's dispatch against a scripted protocol peer (real router process, real sockets).

Checks what the endpoints return for known token streams, and the dispatch rules: stop
strings abort the run on the workers, n > 1 seeds seed + i, Busy -> another decode, full
queue -> 429 with Retry-After, retryable errors re-run elsewhere, a silent worker's
requests end within 10 s, client disconnects abort, /readyz follows heartbeats.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from glmserve.shared import protocol as P

REPLY = "Hello world. STOP here, then more text follows."


def _aborted(peer, rid: str, timeout_s: float = 5.0) -> bool:
    """Whether the peer got an Abort for `rid` within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while rid not in peer.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    return rid in peer.aborted


def test_chat_and_completions_text(fleet):
    router, peer, tok = fleet()
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    n_reply = len(tok.encode(REPLY))
    chat = client.chat.completions.create(model="glm", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=n_reply, temperature=0)
    assert chat.choices[0].message.content == REPLY
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == n_reply
    reserve = peer.messages(P.Reserve)[0]
    assert reserve.sampling.temperature == 0.0 and reserve.sampling.max_new_tokens == n_reply
    r = httpx.post(router.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3,
                                                          "return_token_ids": True}).json()
    assert r["prompt_token_ids"] == [5, 6, 7] and r["choices"][0]["token_ids"] == tok.encode(REPLY)[:3]
    assert P.unpack_ids(peer.messages(P.PrefillRequest)[-1].prompt_ids) == [5, 6, 7]


def test_streaming_usage_and_logprobs(fleet):
    router, peer, tok = fleet()
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    chunks = list(client.chat.completions.create(
        model="glm", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(tok.encode(REPLY)[:5])
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(lps) == 5 and all(lp.logprob == -0.5 and len(lp.top_logprobs) == 2 for lp in lps)
    comp = client.completions.create(model="glm", prompt="x", max_tokens=4, logprobs=1)
    assert comp.choices[0].logprobs.token_logprobs == [-0.5] * 4


def test_stop_string_aborts_run(fleet):
    router, peer, tok = fleet(token_delay_s=0.02)
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "stop": ["STOP"]},
                   timeout=30).json()
    assert r["choices"][0]["text"] == "Hello world. " and r["choices"][0]["finish_reason"] == "stop"
    rid = peer.messages(P.PrefillRequest)[-1].rid
    assert _aborted(peer, rid)  # the workers stop generating for a matched stop string


def test_n_with_seed_uses_seed_plus_i(fleet):
    router, peer, _ = fleet()
    r = httpx.post(router.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 7, "max_tokens": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    reserves = peer.messages(P.Reserve)
    assert sorted(m.sampling.seed for m in reserves) == [7, 8, 9]
    assert len({m.rid for m in reserves}) == 3  # one rid per choice


def test_busy_decode_reroutes(fleet):
    router, peer, _ = fleet(decodes=2, busy={"d0"}, free_pages={"d0": 500, "d1": 10})
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    assert peer.messages(P.Reserve, "d0") and peer.messages(P.Reserved) == []  # peer never sends to itself
    assert peer.messages(P.Reserve, "d1")


def test_queue_full_answers_429(fleet):
    router, peer, _ = fleet(busy={"d0"}, router_args=["--max_queue", "1", "--queue_timeout_s", "2"])
    with httpx.Client(base_url=router.url, timeout=30) as c:
        import threading
        first = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/completions", json={"prompt": "x"})))
        t.start()
        time.sleep(0.5)
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        t.join()
    assert first["r"].status_code == 503 and first["r"].json()["error"]["code"] == "queue_timeout"


def test_retryable_error_reruns_on_other_prefill(fleet):
    router, peer, _ = fleet(prefills=2, fail={"p0"})
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert peer.messages(P.PrefillRequest, "p1")
    metrics = httpx.get(router.url + "/metrics").text
    assert 'router_reruns_total{reason="worker_error"} 1.0' in metrics  # load tests report re-runs by reason


def test_silent_decode_ends_stream_with_error(fleet):
    router, peer, _ = fleet(token_delay_s=0.1)
    t0 = time.monotonic()
    events = []
    with httpx.stream("POST", router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000,
                                                                     "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            events.append(line)
            if len(events) == 6:
                peer.workers["d0"].alive = False
    assert time.monotonic() - t0 < 12
    assert any('"error"' in e and "stopped answering" in e for e in events)
    assert [e for e in events if e][-1] == "data: [DONE]"


def test_client_disconnect_aborts(fleet):
    router, peer, _ = fleet(token_delay_s=0.05)
    with httpx.stream("POST", router.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    rid = peer.messages(P.PrefillRequest)[-1].rid
    assert _aborted(peer, rid)


def test_readyz_follows_heartbeats_and_health_generate(fleet):
    router, peer, _ = fleet()
    assert httpx.get(router.url + "/readyz").status_code == 200
    hg = httpx.get(router.url + "/health_generate", timeout=30)
    assert hg.status_code == 200 and hg.json()["tokens"] == 1
    peer.workers["d0"].alive = False
    time.sleep(3.5)
    assert httpx.get(router.url + "/readyz").status_code == 503
    assert httpx.post(router.url + "/v1/completions", json={"prompt": "x"}).status_code == 503
    peer.workers["d0"].alive = True
    time.sleep(0.6)
    assert httpx.get(router.url + "/readyz").status_code == 200


def test_lightllm_generate_shapes(fleet):
    router, peer, tok = fleet()
    r = httpx.post(router.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}).json()
    assert r["generated_text"] == [tok.decode(tok.encode(REPLY)[:3])]
    assert r["count_output_tokens"] == 3 and r["finish_reason"] == "length"
    assert peer.messages(P.Reserve)[-1].sampling.temperature == 0.0  # do_sample false = greedy
    with httpx.stream("POST", router.url + "/generate_stream",
                      json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 3}}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    import json
    last = json.loads(events[-1][5:])
    assert last["finished"] and last["generated_text"] == tok.decode(tok.encode(REPLY)[:2])
    assert peer.messages(P.Reserve)[-1].sampling.seed == 3


def test_request_timeout_aborts_and_errors(fleet):
    router, peer, _ = fleet(token_delay_s=0.2, router_args=["--request_timeout_s", "1"])
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert _aborted(peer, peer.messages(P.PrefillRequest)[-1].rid)


def test_non_streaming_disconnect_aborts(fleet):
    router, peer, _ = fleet(token_delay_s=0.1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000}, timeout=0.8)
    rid = peer.messages(P.PrefillRequest)[-1].rid
    assert _aborted(peer, rid)
    m = httpx.get(router.url + "/metrics").text
    assert "router_inflight_requests 0.0" in m and "router_inflight_runs 0.0" in m


def test_prompt_forms_n_and_echo(fleet):
    router, peer, tok = fleet()
    r = httpx.post(router.url + "/v1/completions", json={
        "prompt": [[5, 6], [7, 8, 9]], "n": 2, "max_tokens": 2, "return_token_ids": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in r["choices"]] == [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]]
    assert r["usage"]["prompt_tokens"] == 10 and r["usage"]["completion_tokens"] == 8
    r = httpx.post(router.url + "/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 1, "echo": True}).json()
    first = tok.decode(tok.encode(REPLY)[:1])
    assert [c["text"] for c in r["choices"]] == ["ab" + first, "cd" + first]
    with httpx.stream("POST", router.url + "/v1/completions",
                      json={"prompt": "ab", "max_tokens": 2, "echo": True, "stream": True}) as s:
        import json
        texts = [json.loads(x[6:])["choices"][0]["text"] for x in s.iter_lines()
                 if x.startswith("data: {") and json.loads(x[6:])["choices"]]
    assert "".join(texts) == "ab" + tok.decode(tok.encode(REPLY)[:2])
    chat = httpx.post(router.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}],
        "max_tokens": 1}).json()
    assert chat["choices"][0]["message"]["content"] == first
    prompt = tok.decode(P.unpack_ids(peer.messages(P.Reserve)[-1].prompt_ids), skip_special_tokens=False)
    assert "AB" in prompt
