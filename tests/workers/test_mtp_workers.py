"""MTP on the real worker pair (--mtp_step K on the decode): the prefill fills the prompt's MTP-layer KV,
the decode drafts with the MTP layer and verifies; greedy output equals plain single-process decoding
(drafts change speed, never tokens), and drafts were actually verified."""

from __future__ import annotations

import random
import urllib.request

import pytest

from glmserve.shared import protocol as P
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _pages_zero, _start

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch,k,tp,mode", [("glm4_moe", 1, 1, "vanilla_with_att"), ("glm4_moe_lite", 3, 1, "eagle_with_att"),
                                             ("glm4_moe", 2, 2, "vanilla_with_att")])
def test_mtp_greedy_equals_plain_decoding(tmp_path, arch, k, tp, mode):
    """tp 2: both workers at TP 2 (4 processes, 2 gloo KV links); the decode's followers get each
    DRAFT pass's input hidden states by broadcast from the leader. Either chaining mode is lossless."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), arch, seed=3)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=128, chunked_prefill_size=16,
                    extra_decode=("--mtp_step", str(k), "--mtp_mode", mode), tp=tp)  # as deploy does: the prefill needs no flag
    try:
        wp.wait_ready(60 * tp)
        rng = random.Random(5)
        prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (2, 19, 37)]
        ref = generate(ModelRunner(model_dir), prompts, max_new_tokens=10, ignore_eos=True)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(wp, f"m{i}", p, sp), P.Reserved)
        events = _collect(wp, {f"m{i}" for i in range(len(prompts))})
        got = [[t for e in events[f"m{i}"] for t in P.unpack_ids(e.token_ids)] for i in range(len(prompts))]
        assert got == [r["token_ids"] for r in ref]
        _pages_zero(wp)
        text = urllib.request.urlopen(f"http://127.0.0.1:{wp.health['d0']}/metrics", timeout=5).read().decode()
        drafts = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                     if x.startswith("glm_worker_mtp_draft_tokens_total{"))
        assert drafts > 0
    finally:
        wp.stop()
