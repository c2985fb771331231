"""The decode worker's overlap loop (decode_worker/worker.py `step`) against its reference, the same
loop reading every step back before the next (`--disable_overlap_schedule`), and shared.generate.

Real prefill + decode processes, the tiny random model, the test playing the router:
- greedy requests that end on a stop token mid-batch, one ending by length, a seeded sampled one:
  tokens and finish reasons equal shared.generate's (cut at the stop token) with and without overlap;
  with overlap, steps were launched before the previous one was read back, and the rows computed
  for requests that had just stopped were dropped (none of their tokens reached the router);
- a request with a repetition penalty (its sampling reads the token history: the loop drains
  before each step) next to a plain one: the same tokens with and without overlap;
- pages of both workers return to zero (a page released while its step ran is freed after it).
And the running set's planning with a token in flight (pure Python).
"""

from __future__ import annotations

import random

import pytest
import torch

from glmserve.shared import protocol as P
from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.decode_worker.running import RunningSet
from glmserve.decode_worker.state import DecodeSeq
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _metric, _pages_zero, _start


def _seq(rid: str, prompt_len: int, max_new: int, pages: PageAllocator) -> DecodeSeq:
    page_ids = pages.alloc_for(rid, 1)
    seq = DecodeSeq(rid, prompt_len, list(range(prompt_len + 1)), P.SamplingParams(max_new_tokens=max_new),
                    page_ids, "p0", deadline=0.0)
    return seq


def test_planning_with_a_token_in_flight():
    pages = PageAllocator(8)
    rs = RunningSet(pages, page_size=4)
    a, b, c = _seq("a", 2, 10, pages), _seq("b", 3, 10, pages), _seq("c", 1, 2, pages)
    for s in (a, b, c):
        rs.add(s)
    # b (row 1) and c (row 0) have a token in flight; c's is its last (2 output tokens): it sits out
    batch, victim = rs.schedule({"b": 1, "c": 0})
    assert [s.rid for s in batch] == ["a", "b"] and victim is None
    plan = rs.plan_for(batch, {"b": 1, "c": 0})
    assert P.unpack_ids(plan.prev_rows) == [-1, 1]
    assert [s.prefix_len for s in plan.seqs] == [2, 4]  # b writes one past its cached tokens
    assert P.unpack_ids(plan.seqs[1].page_ids) == b.page_ids and len(b.page_ids) == 2  # position 4 needs page 2
    assert rs.plan_for(batch).prev_rows == b""  # nothing in flight: inputs from the host
    # every page taken: with a step in flight nobody is failed (its results may free pages)
    while pages.alloc_for("filler", 1):
        pass
    a.num_cached = 8
    b.num_cached = 8
    c.num_cached = 4
    assert rs.schedule({"a": 0, "b": 1}) == ([], None)
    assert rs.schedule()[1] is c  # the newest is failed only with nothing in flight


def _run_workload(tmp_path, model_dir: str, overlap: bool, stops: dict[str, int], prompts: dict[str, list[int]]):
    tmp_path.mkdir()
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=96, chunked_prefill_size=16,
                    extra_decode=() if overlap else ("--disable_overlap_schedule",))
    try:
        wp.wait_ready(120)
        wave1 = {}
        for rid in ("g0", "g1", "g2", "g3"):
            stop = [stops[rid]] if rid in stops else []
            wave1[rid] = P.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=stop)
        wave1["s0"] = P.SamplingParams(temperature=0.9, seed=7, max_new_tokens=10, ignore_eos=True)
        for rid, sp in wave1.items():
            assert isinstance(_start(wp, rid, prompts[rid], sp), P.Reserved)
        events = _collect(wp, set(wave1), timeout_s=120)
        steps_after_wave1 = _metric(wp, "d0", "glm_worker_decode_overlap_steps_total")
        dropped = _metric(wp, "d0", "glm_worker_decode_overlap_dropped_rows_total")
        wave2 = {"rp": P.SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, repetition_penalty=1.5),
                 "g4": P.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)}
        for rid, sp in wave2.items():
            assert isinstance(_start(wp, rid, prompts[rid], sp), P.Reserved)
        events.update(_collect(wp, set(wave2), timeout_s=120))
        _pages_zero(wp)
        out = {rid: ([t for e in ev for t in P.unpack_ids(e.token_ids)], ev[-1].finish_reason)
               for rid, ev in events.items()}
        return out, steps_after_wave1, dropped
    finally:
        wp.stop()


@pytest.mark.slow
def test_overlap_loop_equals_reference_and_generate(tmp_path):
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=0)
    rng = random.Random(5)
    prompts = {rid: [rng.randrange(3, 250) for _ in range(n)]
               for rid, n in zip(("g0", "g1", "g2", "g3", "s0", "rp", "g4"), (3, 9, 14, 20, 6, 11, 5))}
    runner = ModelRunner(model_dir)
    full = {rid: generate(runner, [prompts[rid]], max_new_tokens=12, ignore_eos=True, page_size=4)[0]["token_ids"]
            for rid in ("g0", "g1", "g2", "g3", "g4")}
    # stop tokens that end g0, g1, g3 at decode steps 3, 6 and 9 while the others go on; g2 runs to its length
    stops = {rid: full[rid][k] for rid, k in (("g0", 3), ("g1", 6), ("g3", 9))}
    want = {}
    for rid, toks in full.items():
        cut = toks.index(stops[rid]) + 1 if rid in stops else len(toks)
        want[rid] = (toks[:cut], "stop" if rid in stops else "length")
    assert all(len(want[r][0]) >= 2 for r in stops), "a stop must land on a decode step"
    seeded = generate(runner, [prompts["s0"]], max_new_tokens=10, temperature=0.9, seed=7, ignore_eos=True,
                      page_size=4)[0]["token_ids"]
    want["s0"] = (seeded, "length")

    got_on, steps_on, dropped_on = _run_workload(tmp_path / "on", model_dir, True, stops, prompts)
    got_off, steps_off, dropped_off = _run_workload(tmp_path / "off", model_dir, False, stops, prompts)
    for rid, w in want.items():
        assert got_on[rid] == w, rid
        assert got_off[rid] == w, rid
    assert got_on["rp"] == got_off["rp"] and got_on["rp"][1] == "length"
    assert steps_on > 0 and dropped_on > 0  # steps chained on the device; stopped requests' extra rows dropped
    assert steps_off == 0 and dropped_off == 0


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_overlap_loop_on_one_gpu(tmp_path):
    """Prefill and decode share GPU 0 (cuda_ipc link), the tiny model in fp32, the overlap loop on:
    pinned non-blocking inputs, device-chained tokens and events for real. One request at a time
    (the reference's shapes): greedy equals shared.generate cut at a stop token. Then 24 at once with
    stops, lengths and seeds: every stream ends exactly at its stop token or its length, rows of
    stopped requests were dropped, pages return to zero."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=0)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (5, 40, 90)]
    runner = ModelRunner(model_dir, device="cuda:0")
    full = [generate(runner, [p], max_new_tokens=16, ignore_eos=True, page_size=16)[0]["token_ids"] for p in prompts]
    del runner
    torch.cuda.empty_cache()
    wp = WorkerPair(model_dir, str(tmp_path), page_size=16, num_pages=256, chunked_prefill_size=64,
                    device="cuda", gpus={"p0": "0", "d0": "0"})
    try:
        wp.wait_ready(300)
        for i, (p, toks) in enumerate(zip(prompts, full)):
            stop = toks[5 + i]
            sp = P.SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True, stop_token_ids=[stop])
            assert isinstance(_start(wp, f"one{i}", p, sp), P.Reserved)
            ev = _collect(wp, {f"one{i}"}, timeout_s=120)[f"one{i}"]
            assert [t for e in ev for t in P.unpack_ids(e.token_ids)] == toks[: toks.index(stop) + 1]
            assert ev[-1].finish_reason == "stop"
        stops = {}
        for i in range(24):
            p = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 60))]
            stops[f"c{i}"] = rng.randrange(3, 250) if i % 3 else None  # rare enough that most run to length
            sp = P.SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_new_tokens=8 + i % 5,
                                  ignore_eos=True, stop_token_ids=[stops[f"c{i}"]] if stops[f"c{i}"] else [])
            assert isinstance(_start(wp, f"c{i}", p, sp), P.Reserved)
            stops[f"c{i}"] = (stops[f"c{i}"], sp.max_new_tokens)
        events = _collect(wp, set(stops), timeout_s=180)
        for rid, (stop, max_new) in stops.items():
            toks = [t for e in events[rid] for t in P.unpack_ids(e.token_ids)]
            if stop is not None and stop in toks:
                assert toks.index(stop) == len(toks) - 1 and events[rid][-1].finish_reason == "stop", rid
            else:
                assert len(toks) == max_new and events[rid][-1].finish_reason == "length", rid
        _pages_zero(wp)
        assert _metric(wp, "d0", "glm_worker_decode_overlap_steps_total") > 0
        assert _metric(wp, "d0", "glm_worker_decode_overlap_dropped_rows_total") > 0
    finally:
        wp.stop()
