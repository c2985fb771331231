"""`--expert_stats`: the worker leaders export experts touched per MoE layer (real worker processes).

The figures come from the model's own routing counts (one scatter_add per MoE layer per forward) read
at heartbeats; the test checks every MoE layer is reported with a count in [top-k, E] and a busiest
expert's share in [1/E, 1], that dense layers are not, that greedy tokens are unchanged with the
counting on, and that workers without the flag export none."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from glmserve.shared import protocol as P
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _start

pytestmark = pytest.mark.slow


def _series(pair: WorkerPair, worker: str, name: str) -> dict[int, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{pair.health[worker]}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            layer = labels.split('layer="')[1].split('"')[0]
            out[int(layer)] = float(value)
    return out


def test_experts_touched_per_layer(tmp_path):
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=1)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    e, k, dense = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["first_k_dense_replace"]
    moe_layers = set(range(dense, cfg["num_hidden_layers"]))
    mtp_layer = cfg["num_hidden_layers"]
    prompts = [[5 + 7 * i + j for j in range(12 + 5 * i)] for i in range(4)]
    ref = generate(ModelRunner(model_dir), prompts, max_new_tokens=8, ignore_eos=True)
    pair = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=64, chunked_prefill_size=16,
                      extra=("--expert_stats",))
    try:
        pair.wait_ready()
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(pair, f"x{i}", p, sp), P.Reserved)
        events = _collect(pair, {f"x{i}" for i in range(len(prompts))})
        for i, r in enumerate(ref):
            assert [t for ev in events[f"x{i}"] for t in P.unpack_ids(ev.token_ids)] == r["token_ids"]

        def reported():  # the windows lag one heartbeat on GPU; on CPU they land at the next one
            pair.pump(0.2)
            return all(moe_layers <= set(_series(pair, w, "glm_worker_moe_experts_touched")) for w in ("p0", "d0"))

        pair.wait(reported, 10, "expert figures of every MoE layer")
        for w in ("p0", "d0"):
            touched = _series(pair, w, "glm_worker_moe_experts_touched")
            share = _series(pair, w, "glm_worker_moe_expert_max_share")
            # the prefill also runs the MTP layer (index num_hidden_layers) to fill its KV; this decode
            # (no --mtp_step) does not
            assert set(touched) == moe_layers | ({mtp_layer} if w == "p0" else set()), (w, touched)
            assert all(k <= v <= e for v in touched.values()), (w, touched)
            assert set(share) == set(touched) and all(1 / e <= v <= 1 for v in share.values()), (w, share)
    finally:
        pair.stop()


def test_no_expert_series_without_the_flag(tmp_path):
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe", seed=0)
    pair = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=32)
    try:
        pair.wait_ready()
        for w in ("p0", "d0"):
            assert not _series(pair, w, "glm_worker_moe_experts_touched")
    finally:
        pair.stop()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_window_counts_graph_steps_without_waiting(device, tmp_path):
    """The window counts every routed row of DECODE steps run through the graph buckets (on CUDA the
    captured graphs' scatter_adds; pad rows included: 5 rows run as bucket 8), read back one call late
    on CUDA (non-blocking copy + event), at once on CPU."""
    import torch

    from glmserve.shared.kvcache.cache import PagedKVCache
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint
    from glmserve.shared.worker_common.expert_stats import ExpertWindow
    from tests.models.test_decode_graphs import PAGE, _decode_batch

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=3)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    k, e = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    runner = ModelRunner(model_dir, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    win = ExpertWindow(runner)
    kv = PagedKVCache(runner.kv_layout(PAGE), 48, device)
    assert 8 in runner.capture_decode_graphs(kv, max_batch_size=8, max_seq_len=16)

    def settled():  # on CUDA: the copy launched by the call before is the one read
        if device == "cuda":
            torch.cuda.synchronize()
            win.window()
            torch.cuda.synchronize()
        return win.window()

    settled()  # capture's warm-up forwards
    batch = _decode_batch(5, torch.Generator().manual_seed(0), device)
    for _ in range(3):
        runner.forward(batch, kv)
    got = settled()
    main = [i for i in runner.moe_layer_indices() if i < cfg["num_hidden_layers"]]  # not the MTP layer
    assert [w.layer for w in got] == main
    for w in got:
        assert w.tokens == 3 * 8 * k and k <= w.touched <= e and 1 / e <= w.max_share <= 1, w
    assert settled() == []  # nothing ran since
