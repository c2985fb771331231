"""MTP through the real fleet (router + prefill + decode subprocesses, --mtp_step K on both workers).

- Random tiny checkpoints, K = 1, 2, 4, both architectures: greedy output equals MTP-off output
  token for token (the MTP-off reference is shared.generate, which the fleet's own tests show the
  MTP-off fleet equals), with several requests of different lengths decoding together (so one
  batch holds different acceptance lengths); drafts were verified; every decode page comes back.
- The constructed checkpoint (shared.weights.constructed_mtp), K = 3: every draft accepted, K + 1
  tokens per verify step (step count), a stop token landing inside a draft ends the request with
  nothing after it, and pages come back.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.fleet import Fleet, start_fleet

pytestmark = pytest.mark.slow


def _complete(fleet: Fleet, prompt: list[int], max_tokens: int, **extra) -> list[int]:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    req = urllib.request.Request(fleet.base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def _metric_sum(fleet: Fleet, worker: str, name: str, label: str = "") -> float:
    """Sum of a metric's samples on one worker (those carrying `label`, e.g. 'position="1"', if given)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{fleet.health_ports[worker]}/metrics", timeout=5).read()
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.decode().splitlines()
               if x.startswith(name + "{") and label in x)


def _pages_back(fleet: Fleet) -> None:
    """Every worker's used pages return to 0 (the heartbeat refreshes the gauge) and no leak was counted."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(_metric_sum(fleet, w, "glm_worker_kv_pages_used") == 0 for w in ("p0", "d0")):
            break
        time.sleep(0.2)
    assert _metric_sum(fleet, "d0", "glm_worker_kv_pages_used") == 0
    assert _metric_sum(fleet, "d0", "glm_worker_page_leaks_total") == 0


def _write_model(path: str, arch: str, constructed: bool) -> str:
    from glmserve.shared.tokenizer.builtin import BUILTIN_EOS_IDS, BUILTIN_PAD_ID, BUILTIN_VOCAB_SIZE, write_builtin_tokenizer
    from glmserve.shared.weights.constructed_mtp import write_constructed_mtp_checkpoint
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    kw = dict(vocab_size=BUILTIN_VOCAB_SIZE, eos_token_id=list(BUILTIN_EOS_IDS), pad_token_id=BUILTIN_PAD_ID)
    (write_constructed_mtp_checkpoint if constructed else write_tiny_checkpoint)(path, arch, seed=2, **kw)
    write_builtin_tokenizer(path)
    return path


@pytest.mark.parametrize("arch,k", [("glm4_moe", 1), ("glm4_moe_lite", 2), ("glm4_moe", 4), ("glm4_moe_lite", 4),
                                    ("glm4_moe_lite", 1), ("glm4_moe", 2)])
def test_greedy_mtp_equals_mtp_off(tmp_path, arch, k):
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    model_dir = _write_model(str(tmp_path / "m"), arch, constructed=False)
    rng = random.Random(k)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (3, 14, 29, 6)]
    max_tokens = [9, 12, 7, 10]
    ref = [generate(ModelRunner(model_dir), [p], n, ignore_eos=True)[0]["token_ids"]
           for p, n in zip(prompts, max_tokens)]
    fleet = start_fleet(model_dir, str(tmp_path), page_size=4, num_pages=96, worker_args=("--mtp_step", str(k)))
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda a: _complete(fleet, *a), zip(prompts, max_tokens)))
        assert got == ref
        if k == 2:  # sampled requests draft too (rejection sampling): a seed reproduces its tokens
            sampled = [_complete(fleet, prompts[1], 10, temperature=0.9, seed=7) for _ in range(2)]
            assert sampled[0] == sampled[1] and len(sampled[0]) == 10
        drafts = _metric_sum(fleet, "d0", "glm_worker_mtp_draft_tokens_total")
        assert drafts > 0 and drafts % k == 0
        _pages_back(fleet)
    finally:
        fleet.stop()


def test_constructed_model_accepts_every_draft(tmp_path):
    from glmserve.shared.weights.constructed_mtp import chain, next_token_map

    k = 3
    model_dir = _write_model(str(tmp_path / "m"), "glm4_moe_lite", constructed=True)
    f = next_token_map(model_dir)
    fleet = start_fleet(model_dir, str(tmp_path), page_size=4, num_pages=96, worker_args=("--mtp_step", str(k)))
    try:
        prompt = [17, 23, 101]
        n = 1 + 3 * (k + 1)  # the prefill's first token, then 3 verify steps of K + 1 tokens
        assert _complete(fleet, prompt, n) == chain(prompt[-1], f, n)
        assert _metric_sum(fleet, "d0", "glm_worker_step_seconds_count") == 3
        assert _metric_sum(fleet, "d0", "glm_worker_mtp_draft_tokens_total") == 3 * k
        assert _metric_sum(fleet, "d0", "glm_worker_mtp_accepted_tokens_total") == 3 * k
        assert _metric_sum(fleet, "d0", "glm_worker_mtp_mean_acceptance_length") == k + 1
        for j in range(1, k + 1):
            assert _metric_sum(fleet, "d0", "glm_worker_mtp_accepted_by_position_total",
                               f'position="{j}"') == 3
        # a stop token that lands in the middle of an accepted draft run: nothing after it is sent
        want = chain(prompt[-1], f, 12)
        stop = want[6]  # the 7th token: 1 (prefill) + 4 (step 1) + the 2nd of step 2
        assert stop not in want[:6]
        got = _complete(fleet, prompt, 12, stop_token_ids=[stop], ignore_eos=False)
        assert got == want[:7] or got == want[:6]  # the stop token itself is reported or stripped
        _pages_back(fleet)
    finally:
        fleet.stop()
