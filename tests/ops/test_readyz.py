"""Issue 4, readiness: `/readyz` is 503 while weights load and while no decode worker is alive (real fleet).

The model is a config-only checkpoint loaded with `--load-format dummy` at a size (~150M params, 32 experts
of 512x512 in 5 MoE layers + MTP) whose random-weight build takes seconds on CPU: a real slow load, no sleep
hook. Shown: each worker's /healthz is 200 while its /readyz is 503 "loading weights", and the router's
/readyz stays 503 until both workers are ready; after kill -9 of the only decode worker the router's /readyz
turns 503 within the 3 s heartbeat timeout (+1 s) and generation answers 503 `no_ready_workers` (no hang);
the restarted decode is again 503 "loading" first, and the router is ready and serving once it is back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request

import httpx
import pytest

try:
    from tests.e2e.fleet import start_fleet
except ImportError:  # tests/ not importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from e2e.fleet import start_fleet

pytestmark = pytest.mark.slow
SLOW_SHAPE = dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, n_routed_experts=32,
                  num_hidden_layers=6, n_group=4, topk_group=2, num_experts_per_tok=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64)


def _slow_model(root: str) -> str:
    """A tiny checkpoint's tokenizer + its config.json scaled up (weights come from --load-format dummy)."""
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(os.path.join(root, "tiny"), "glm4_moe", seed=0, with_tokenizer=True)
    path = os.path.join(root, "slow")
    os.makedirs(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), path)
    with open(os.path.join(tiny, "config.json")) as f:
        cfg = {**json.load(f), **SLOW_SHAPE}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def _get(port: int, path: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


@pytest.fixture(scope="module")
def rising_fleet(tmp_path_factory):
    model_dir = _slow_model(str(tmp_path_factory.mktemp("slow_model")))
    fleet = start_fleet(model_dir, str(tmp_path_factory.mktemp("readyz_logs")), num_pages=128,
                        worker_args=("--load-format", "dummy"), wait=False)
    yield fleet
    fleet.stop()


def _router_port(fleet) -> int:
    return int(fleet.base_url.rsplit(":", 1)[1])


def _watch(fleet, workers: tuple[str, ...], timeout_s: float) -> list[dict]:
    """Poll every 50 ms until the router and `workers` are all ready: [{t, <wid>: (health, ready, body), router}]."""
    samples, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        s = {"t": time.monotonic() - t0}
        for w in workers:
            s[w] = (_get(fleet.health_ports[w], "/healthz")[0], *_get(fleet.health_ports[w], "/readyz"))
        s["router"] = _get(_router_port(fleet), "/readyz")[0]
        samples.append(s)
        if s["router"] == 200 and all(s[w][1] == 200 for w in workers):
            return samples
        for name, p in fleet.procs.items():
            assert p.poll() is None, f"{name} died:\n" + open(fleet.logs[name]).read()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"not ready in {timeout_s}s; last sample {samples[-1]}")


def _check_loading_then_ready(samples: list[dict], workers: tuple[str, ...]) -> dict[str, float]:
    """Each worker was seen alive but 'loading weights'; the router was never ready before the workers."""
    first_ready = {}
    for w in workers:
        loading = [s for s in samples if s[w][0] == 200 and s[w][1] == 503 and "loading" in s[w][2]]
        assert loading, f"{w}: never seen alive-but-loading"
        assert all(s["router"] == 503 for s in loading)
        first_ready[w] = min(s["t"] for s in samples if s[w][1] == 200)
        first_ready[w + "_loading_s"] = max(s["t"] for s in loading) - min(s["t"] for s in loading)
    first_ready["router"] = min(s["t"] for s in samples if s["router"] == 200)
    assert first_ready["router"] >= max(first_ready[w] for w in workers) - 0.2  # one poll round of slack
    return first_ready


def test_not_ready_while_weights_load(rising_fleet):
    samples = _watch(rising_fleet, ("p0", "d0"), timeout_s=180)
    times = _check_loading_then_ready(samples, ("p0", "d0"))
    print("ready times (s after spawn):", {k: round(v, 2) for k, v in times.items()})
    # ignore_eos: the random model samples an EOS id now and then (temperature 1), ending the request early
    r = httpx.post(rising_fleet.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_not_ready_without_decode_and_back_after_restart(rising_fleet):
    fleet = rising_fleet
    _watch(fleet, ("p0", "d0"), timeout_s=180)
    os.kill(fleet.procs["d0"].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    while _get(_router_port(fleet), "/readyz")[0] == 200:
        assert time.monotonic() - t_kill < 4.0, "router still ready 4 s after its only decode died"
        time.sleep(0.05)
    print(f"router /readyz 503 {time.monotonic() - t_kill:.2f}s after kill -9 of the decode")
    r = httpx.post(fleet.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_ready_workers"
    fleet.procs["d0"].wait(5)
    fleet.restart("d0")
    samples = _watch(fleet, ("d0",), timeout_s=180)
    times = _check_loading_then_ready(samples, ("d0",))
    print("after restart:", {k: round(v, 2) for k, v in times.items()})
    r = httpx.post(fleet.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
