"""The hostile corpus (hostile_corpus.py, >= 200 requests over every endpoint and field)
against a real router process: every answer is a 4xx with an OpenAI-style error body, the
router never answers 5xx for them and keeps serving afterwards."""

from __future__ import annotations

import httpx

from hostile_corpus import corpus
from glmserve.shared.tokenizer.glm_tokenizer import load_tokenizer


def test_hostile_corpus_all_4xx(router_url):
    cases = corpus(load_tokenizer(None).vocab_size, max_total_len=256, body_limit=65536)
    assert len(cases) >= 200
    failures = []
    with httpx.Client(base_url=router_url, timeout=30) as c:
        for case in cases:
            r = c.request(case.method, case.path, content=case.body,
                          headers={"Content-Type": "application/json"})
            ok = (r.status_code == case.status) if case.status else 400 <= r.status_code < 500
            try:
                err = r.json()["error"]
                ok = ok and isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= err.keys()
            except Exception:
                ok = False
            if not ok:
                failures.append(f"{case.name}: {r.status_code} {r.text[:200]}")
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/models").json()["data"][0]["id"] == "glm"
    assert not failures, f"{len(failures)}/{len(cases)} hostile requests mishandled:\n" + "\n".join(failures)


def test_valid_request_without_workers_is_503(router_url):
    r = httpx.post(router_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_ready_workers"
    assert r.headers["retry-after"] == "1"


def test_error_names_the_field(router_url):
    r = httpx.post(router_url + "/v1/completions", json={"prompt": "x", "top_p": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = httpx.post(router_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]})
    assert r.json()["error"]["param"] == "messages[0].content"
    r = httpx.post(router_url + "/generate", json={"inputs": "x", "parameters": {"top_k": 0}})
    assert r.json()["error"]["param"] == "parameters.top_k"


def test_giant_chunked_body_is_413(router_url):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(router_url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
