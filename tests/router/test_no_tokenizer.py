"""A checkpoint without tokenizer.json: the router warns once and serves token-id requests (as vLLM's
--skip-tokenizer-init) instead of exiting into a supervisord restart loop; everything that needs text
(a text prompt, chat, stop strings) gets a 400 that says what to send instead. Real CPU fleet."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

try:
    from e2e.conftest import _write_model
    from e2e.fleet import start_fleet
except ImportError:
    from tests.e2e.conftest import _write_model
    from tests.e2e.fleet import start_fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model_dir = _write_model(str(tmp_path_factory.mktemp("no_tok_model")), "glm4_moe_lite")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            os.remove(os.path.join(model_dir, name))
    f = start_fleet(model_dir, str(tmp_path_factory.mktemp("no_tok_logs")))
    yield f
    f.stop()


def test_token_id_prompts_are_served(fleet):
    r = httpx.post(fleet.base_url + "/v1/completions", timeout=60, json={
        "model": "default", "prompt": [5, 6, 7, 8], "max_tokens": 5, "ignore_eos": True, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == 5 and choice["text"] == ""
    assert r.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    with httpx.stream("POST", fleet.base_url + "/v1/completions", timeout=60, json={
            "model": "default", "prompt": [5, 6, 7, 8], "max_tokens": 5, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True}) as s:
        assert s.status_code == 200
        body = s.read().decode()
    assert body.rstrip().endswith("data: [DONE]")
    streamed = [t for line in body.splitlines() if line.startswith("data: {")
                for c in httpx.Response(200, content=line[6:]).json()["choices"] for t in c.get("token_ids") or []]
    assert streamed == choice["token_ids"]  # greedy: the same ids streamed and not


@pytest.mark.parametrize("path,body,what", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "a text prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "chat"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "stop": ["x"]}, "stop strings"),
    ("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 2}}, "a text prompt"),
])
def test_text_requests_get_a_clear_400(fleet, path, body, what):
    r = httpx.post(fleet.base_url + path, json={"model": "default", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "no_tokenizer" and err["message"].startswith(what) and "token ids" in err["message"]


def test_router_warned_and_stayed_up(fleet):
    assert fleet.procs["router"].poll() is None
    log = open(fleet.logs["router"]).read()
    assert "no tokenizer.json in" in log and "serving token-id requests only" in log
    assert httpx.get(fleet.base_url + "/readyz", timeout=5).status_code == 200
    assert httpx.get(fleet.base_url + "/health_generate", timeout=30).json()["ok"] is True
