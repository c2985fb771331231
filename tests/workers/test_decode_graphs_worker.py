"""The decode worker with graph buckets on (`--graph_max_batch_size`): CPU runs the padded batches
eagerly (the graph path minus the capture), so it checks the padding, the dummy page and the
leader -> follower capture plan without a GPU. On CUDA (gpu test) the same check replays graphs.

- greedy tokens equal shared.generate's while batches of 3 are padded to bucket 4 and sequences
  past --graph_max_seq_len fall back to eager steps; the graph-step counter moved; pages return to 0;
- the same with --mtp_step 2: VERIFY steps of 3 tokens per sequence padded to their buckets;
- graph_spec: device defaults, the cap at --max_running, the seq-len fallbacks, MTP's VERIFY graphs.
"""

from __future__ import annotations

import random

import pytest
import torch

from decode_worker.graphs import graph_spec
from shared import protocol as P
from shared.worker_common.plan import GraphSpec, StepPlan, decode_plan, encode_plan
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _metric, _pages_zero, _start


def test_graph_spec_defaults_and_limits():
    assert graph_spec("cpu", None, 0, 64, 0, 4096, 0) is None  # cpu: off unless asked
    assert graph_spec("cuda", None, 0, 64, 0, 4096, 0) == GraphSpec(64, 4096)  # capped at max_running
    assert graph_spec("cuda", None, 0, 256, 2048, 4096, 0) == GraphSpec(128, 2048)
    assert graph_spec("cuda", 16, 8192, 256, 2048, 4096, 0) == GraphSpec(16, 4096)  # never past the model
    assert graph_spec("cuda", 0, 0, 64, 0, 4096, 0) is None
    assert graph_spec("cpu", 8, 100, 64, 0, 4096, 0) == GraphSpec(8, 100)
    assert graph_spec("cuda", None, 0, 64, 0, 4096, 2) == GraphSpec(64, 4096, 3)  # MTP: VERIFY of K + 1 tokens
    assert graph_spec("cuda", None, 0, 64, 0, 4096, 4, page_size=4) is None  # 5 verify tokens > a page
    with pytest.raises(ValueError):
        graph_spec("cuda", -1, 0, 64, 0, 4096, 0)
    plan = decode_plan(encode_plan(StepPlan(mode="", graphs=GraphSpec(8, 100, 3))))
    assert plan.graphs == GraphSpec(8, 100, 3) and decode_plan(encode_plan(StepPlan(mode=""))).graphs is None


def _check_pair(tmp_path, device: str, dtype: str, tp: int = 1, gpus=None, mtp_step: int = 0):
    from shared.generate import generate
    from shared.runner.model_runner import ModelRunner
    from shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=0)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=64, chunked_prefill_size=16, tp=tp,
                    device=device, dtype=dtype, gpus=gpus,
                    extra_decode=("--graph_max_batch_size", "4", "--graph_max_seq_len", "32",
                                  "--mtp_step", str(mtp_step)))
    try:
        wp.wait_ready(300)
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (3, 17, 27)]  # 27 + 8 > 32: eager tail
        runner = ModelRunner(model_dir, device="cuda:0" if device == "cuda" else "cpu", dtype=dtype)
        ref = [generate(runner, [p], max_new_tokens=8, ignore_eos=True, page_size=4)[0]["token_ids"]
               for p in prompts]
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(wp, f"g{i}", p, sp), P.Reserved)
        events = _collect(wp, {f"g{i}" for i in range(len(prompts))}, timeout_s=120)
        got = [[t for e in events[f"g{i}"] for t in P.unpack_ids(e.token_ids)] for i in range(len(prompts))]
        assert got == ref
        _pages_zero(wp)  # heartbeats after the requests: the graph-step counter is current too
        assert _metric(wp, "d0", "glm_worker_decode_graph_steps_total") > 0
        kind = "decode" if mtp_step == 0 else f"verify q={mtp_step + 1}"
        assert f"{kind} graphs for batch [1, 2, 4], seq len <= 32" in open(wp.logs["d0"]).read()
    finally:
        wp.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mtp_step", [0, 2])
def test_padded_decode_worker_equals_generate_cpu(tmp_path, mtp_step):
    _check_pair(tmp_path, "cpu", "float32", mtp_step=mtp_step)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mtp_step", [0, 2])
def test_graph_decode_worker_equals_generate_cuda(tmp_path, mtp_step):
    _check_pair(tmp_path, "cuda", "float32", gpus={"p0": "0", "d0": "1"}, mtp_step=mtp_step)
