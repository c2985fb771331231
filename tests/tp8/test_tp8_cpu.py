"""Issue 9 on CPU: tensor parallelism at TP-8 (gloo) gives the TP=1 single-process greedy output.

- `python -m glmserve.shared.generate --tp 8` (one 8-process gloo group: the CPU analogue of "a single TP-8
  worker") equals `shared.generate` at TP=1, token for token, logprobs within 1e-4, both architectures;
- the real fleet with a TP-4 prefill worker and a TP-4 decode worker (8 worker processes, KV moved rank
  i -> rank i over 4 gloo links) behind the real router equals the TP=1 reference for concurrent
  requests, and every rank's pages return to zero.
Bigger runs (both architectures in the fleet, longer outputs): bench/tp8_cpu.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import pytest

try:
    from tests.e2e.fleet import start_fleet
    from tests.tp8.tp8_models import ARCHS, PROMPTS, reference_outputs, write_tp8_model
except ImportError:  # tests/ not importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from e2e.fleet import start_fleet
    from tp8.tp8_models import ARCHS, PROMPTS, reference_outputs, write_tp8_model

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tp8_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp8_models")
    return {arch: write_tp8_model(str(root / arch), arch) for arch in ARCHS}


def _generate(model_dir: str, tp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "glmserve.shared.generate", "--model_dir", model_dir, "--prompt_ids_json",
           json.dumps(PROMPTS), "--max_new_tokens", str(NEW_TOKENS), "--ignore_eos", "--tp", str(tp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_tp8_equals_tp1(tp8_dirs, arch):
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    want = generate(ModelRunner(tp8_dirs[arch], with_mtp=False), PROMPTS, NEW_TOKENS, ignore_eos=True)
    got = _generate(tp8_dirs[arch], 8)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    for g, w in zip(got, want):
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) < 1e-4


def _complete(base_url: str, prompt: list[int]) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="x", timeout=120, max_retries=0)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(r.choices[0].model_extra["token_ids"])


def _pages_zero(fleet, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        used = {w: fleet.metric(w, "glm_worker_kv_pages_used") for w in fleet.health_ports}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.25)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_fleet_prefill_tp4_decode_tp4_equals_tp1(tp8_dirs, tmp_path):
    """8 worker processes (2 leaders + 6 followers) + router; chunked prefill (8 tokens, page 4) so the
    22-token prompt crosses chunks and pages; the three prompts run concurrently (batched)."""
    model_dir = tp8_dirs["glm4_moe"]
    want = reference_outputs(model_dir, PROMPTS, NEW_TOKENS)
    fleet = start_fleet(model_dir, str(tmp_path), num_pages=64, chunked_prefill_size=8, timeout_s=240,
                        worker_args=("--tp", "4"))
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda p: _complete(fleet.base_url, p), PROMPTS))
        assert got == want
        assert [len(_children(fleet.procs[w].pid)) for w in ("p0", "d0")] == [3, 3]  # follower ranks 1..3
        assert not any(_pages_zero(fleet).values())
        assert all(p.poll() is None for p in fleet.procs.values())
    finally:
        fleet.stop()
