"""GPU: prefill on cuda:0, decode on cuda:1, KV over the NCCL KVLink (the lead runs these).

- tiny checkpoint in fp32: the pair's greedy tokens equal shared.generate on cuda:0;
- GLM-4.7-Flash config with dummy weights in bf16: one request at a time (same shapes as the
  single-process reference, so bf16 numerics match), greedy tokens equal, and the workers'
  KV-transfer GB/s is printed (run with -s to see it).
"""

from __future__ import annotations

import json
import random
import urllib.request

import pytest
import torch

from shared import protocol as P
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _pages_zero, _start

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _metric(wp: WorkerPair, worker: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{wp.health[worker]}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _run(wp: WorkerPair, prompts, max_new: int) -> list[list[int]]:
    sp = P.SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    out = []
    for i, p in enumerate(prompts):  # one at a time: batch shapes equal the reference's
        assert isinstance(_start(wp, f"q{i}", p, sp), P.Reserved)
        ev = _collect(wp, {f"q{i}"}, timeout_s=300)[f"q{i}"]
        out.append([t for e in ev for t in P.unpack_ids(e.token_ids)])
    return out


@needs_2
@pytest.mark.parametrize("mtp_step", [0, 2])
def test_gpu_pair_tiny_fp32_equals_generate(tmp_path, mtp_step):
    """Greedy (plain and with MTP drafts) and seeded sampling on GPU equal shared.generate on cuda:0."""
    from shared.generate import generate
    from shared.runner.model_runner import ModelRunner
    from shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=0)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=16, num_pages=256, chunked_prefill_size=64,
                    device="cuda", gpus={"p0": "0", "d0": "1"}, extra_decode=("--mtp_step", str(mtp_step)))
    try:
        wp.wait_ready(300)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (5, 70, 150)]
        runner = ModelRunner(model_dir, device="cuda:0")
        ref = [generate(runner, [p], max_new_tokens=8, ignore_eos=True, page_size=16)[0]["token_ids"] for p in prompts]
        assert _run(wp, prompts, 8) == ref
        seeded = generate(runner, [prompts[1]], max_new_tokens=8, temperature=0.9, seed=7, ignore_eos=True,
                          page_size=16)[0]["token_ids"]
        sp = P.SamplingParams(temperature=0.9, seed=7, max_new_tokens=8, ignore_eos=True)
        _start(wp, "seeded", prompts[1], sp)
        ev = _collect(wp, {"seeded"}, timeout_s=120)["seeded"]
        assert [t for e in ev for t in P.unpack_ids(e.token_ids)] == seeded
        _pages_zero(wp)
    finally:
        wp.stop()


@needs_2
@pytest.mark.parametrize("prompt_len", [1024, 4096])
def test_gpu_pair_flash_dummy_bf16(tmp_path, prompt_len):
    from shared.generate import generate
    from shared.runner.model_runner import ModelRunner

    model_dir = tmp_path / "flash"
    model_dir.mkdir()
    cfg = {"model_type": "glm4_moe_lite", "num_nextn_predict_layers": 1, "dtype": "bfloat16",
           "eos_token_id": [154820, 154827, 154829], "pad_token_id": 154820}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    rng = random.Random(prompt_len)
    prompts = [[rng.randrange(3, 150000) for _ in range(prompt_len)]]
    runner = ModelRunner(str(model_dir), device="cuda:0", dtype="bfloat16", load_format="dummy", with_mtp=False)
    ref = [generate(runner, [p], max_new_tokens=16, ignore_eos=True, page_size=16)[0]["token_ids"] for p in prompts]
    del runner  # ~60 GB of bf16 weights: free cuda:0 for the prefill worker
    torch.cuda.empty_cache()
    wp = WorkerPair(str(model_dir), str(tmp_path), page_size=16, num_pages=2048, chunked_prefill_size=8192,
                    device="cuda", gpus={"p0": "0", "d0": "1"}, dtype="bfloat16", load_format="dummy")
    try:
        wp.wait_ready(600)
        got = _run(wp, prompts, 16)
        _pages_zero(wp)
        gbps = _metric(wp, "p0", "glm_worker_kv_transfer_gbps")
        nbytes = _metric(wp, "p0", "glm_worker_kv_transfer_bytes_total")
        print(f"\n[flash bf16 dummy] prompt {prompt_len}: KV bytes {nbytes:.0f}, per-transfer GB/s {gbps:.1f}; "
              f"tokens equal: {got == ref}")
        assert got == ref
    finally:
        wp.stop()
