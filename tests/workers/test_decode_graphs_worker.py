"""The decode worker with graph buckets on (`--graph_max_batch_size`): CPU runs the padded batches
eagerly (the graph path minus the capture), so it checks the padding, the dummy page and the
leader -> follower capture plan without a GPU. On CUDA (gpu test) the same check replays graphs.

- greedy tokens equal shared.generate's while batches of 3 are padded to bucket 4 and sequences
  past --graph_max_seq_len fall back to eager steps; the graph-step counter moved; pages return to 0;
- the same with --mtp_step 2: VERIFY steps of 3 tokens per sequence padded to their buckets;
- the constructed MTP checkpoint with K = 3 and graph buckets: the padded first draft pass picks each
  request's real last row (every draft accepted: K + 1 tokens per step), several requests at once;
- graph_spec: device defaults, the cap at --max_running, the seq-len fallbacks, MTP's VERIFY graphs.
"""

from __future__ import annotations

import random

import pytest
import torch

from glmserve.decode_worker.graphs import graph_spec
from glmserve.shared import protocol as P
from glmserve.shared.worker_common.plan import GraphSpec, StepPlan, decode_plan, encode_plan
from tests.workers.harness import WorkerPair
from tests.workers.test_worker_procs import _collect, _metric, _pages_zero, _start


def test_graph_spec_defaults_and_limits():
    assert graph_spec("cpu", None, 0, 64, 0, 4096, 0) is None  # cpu: off unless asked
    assert graph_spec("cuda", None, 0, 64, 0, 4096, 0) == GraphSpec(64, 4096)  # capped at max_running
    assert graph_spec("cuda", None, 0, 256, 2048, 4096, 0) == GraphSpec(256, 2048)  # every batch it may run
    assert graph_spec("cuda", None, 0, 1024, 2048, 4096, 0) == GraphSpec(512, 2048)
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
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

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
        kind = "decode q=1" if mtp_step == 0 else f"verify q={mtp_step + 1}"
        assert f"{kind} graphs for batch [1, 2, 4], seq len <= 32" in open(wp.logs["d0"]).read()
    finally:
        wp.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mtp_step", [0, 2])
def test_padded_decode_worker_equals_generate_cpu(tmp_path, mtp_step):
    _check_pair(tmp_path, "cpu", "float32", mtp_step=mtp_step)


@pytest.mark.slow
def test_padded_drafts_keep_full_acceptance_cpu(tmp_path):
    from glmserve.shared.weights.constructed_mtp import chain, next_token_map, write_constructed_mtp_checkpoint

    k = 3
    model_dir = write_constructed_mtp_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=2)
    f = next_token_map(model_dir)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=96, chunked_prefill_size=16,
                    extra_decode=("--graph_max_batch_size", "4", "--mtp_step", str(k)))
    try:
        wp.wait_ready(300)
        prompts = [[17, 23, 101], [5, 9], [44, 45, 46, 47, 48, 49, 50]]
        n = 1 + 3 * (k + 1)  # the prefill's first token, then 3 verify steps of K + 1 tokens
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(wp, f"c{i}", p, sp), P.Reserved)
        events = _collect(wp, {f"c{i}" for i in range(len(prompts))}, timeout_s=120)
        for i, p in enumerate(prompts):
            assert [t for e in events[f"c{i}"] for t in P.unpack_ids(e.token_ids)] == chain(p[-1], f, n)
        _pages_zero(wp)
        assert _metric(wp, "d0", "glm_worker_mtp_accepted_tokens_total") == 3 * k * len(prompts)
        assert _metric(wp, "d0", "glm_worker_decode_graph_steps_total") >= 3 * 3  # draft, chain, verify
        log = open(wp.logs["d0"]).read()
        assert all(f"{kind} graphs for batch [1, 2, 4]" in log for kind in ("verify q=4", "draft q=4", "draft q=1"))
    finally:
        wp.stop()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mtp_step", [0, 2])
def test_graph_decode_worker_equals_generate_cuda(tmp_path, mtp_step):
    _check_pair(tmp_path, "cuda", "float32", gpus={"p0": "0", "d0": "1"}, mtp_step=mtp_step)


def test_padded_first_draft_pass_equals_unpadded(tmp_path):
    """In one process: drafts of requests with 1, 3 and 2 pending MTP rows (K = 3) are the same whether the
    first pass runs as is or padded to K + 1 rows per request through the DRAFT graph buckets (CPU: padded
    eager), and the pad rows leave the real rows' MTP KV untouched."""
    import time

    from glmserve.decode_worker import mtp
    from glmserve.decode_worker.state import DecodeSeq
    from glmserve.shared.weights.tiny import write_tiny_checkpoint
    from glmserve.shared.worker_common.config import common_parser, worker_config
    from glmserve.shared.worker_common.engine import Engine
    from glmserve.shared.worker_common.tp import TPFanout

    k, page = 3, 4
    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=5)
    a = common_parser("decode").parse_args(["--model_dir", model_dir, "--control_addr", "tcp://127.0.0.1:1",
                                            "--router_addr", "tcp://127.0.0.1:2", "--page_size", str(page),
                                            "--num_pages", "16", "--mtp_step", str(k)])
    engine = Engine(worker_config("decode", a), TPFanout(0, 1, 0, "cpu"))
    gen = torch.Generator().manual_seed(0)
    engine.cache.buffer.normal_(generator=gen)  # arbitrary KV before the pending rows
    h = engine.runner.config.hidden_size
    seqs = []
    for i, (n_rows, first_pos) in enumerate([(1, 5), (3, 2), (2, 7)]):
        s = DecodeSeq(f"r{i}", 3, [1, 2, 3], P.SamplingParams(temperature=0), [1 + 4 * i + j for j in range(4)],
                      "p0", time.monotonic())
        s.mtp_rows = [(first_pos + j, int(torch.randint(3, 200, (1,), generator=gen))) for j in range(n_rows)]
        s.mtp_hidden = torch.randn(n_rows, h, generator=gen)
        seqs.append(s)
    before = engine.cache.buffer.clone()
    first = {}
    for pad in (False, True):  # the first pass alone: same logits and last-row MTP output, tight
        plans, hidden, last = mtp._first_pass(seqs, k, pad)
        out = engine.run(StepPlan(mode="draft", seqs=plans), prev_hidden=hidden)
        first[pad] = (out.logits, out.hidden[last])
        assert out.hidden.shape[0] == (len(seqs) * (k + 1) if pad else 6)
        engine.cache.buffer.copy_(before)
    for got, ref in zip(first[True], first[False]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    want = mtp.draft(engine, seqs, [], k, [True] * 3)
    want_cache = engine.cache.buffer.clone()
    engine.cache.buffer.copy_(before)
    engine.capture_graphs(4, 16, k + 1)
    runs = engine.runner.graph_runs()
    assert mtp.draft(engine, seqs, [], k, [True] * 3) == want
    assert engine.runner.graph_runs() == runs + k  # the padded first pass and k - 1 chained passes
    layer = engine.runner.config.num_hidden_layers  # the MTP layer's cache
    for s in seqs:  # every position up to the last chained draft: the same MTP KV as unpadded
        for pos in range(s.mtp_rows[-1][0] + k):
            pg, off = s.page_ids[pos // page], pos % page
            torch.testing.assert_close(engine.cache.buffer[layer, :, pg, off], want_cache[layer, :, pg, off])


def test_to_batch_packs_the_host_copies_and_picks_logits_rows():
    """to_batch moves the batch in two packed copies (to_device): every field equals ForwardBatch.build's,
    with its dtype, shape and a 16-byte aligned start; logits_row / want_logits pick the logits rows."""
    from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
    from glmserve.shared.worker_common.plan import seq_plan, to_batch, to_device

    seqs = [([1, 2, 3], 5, [1, 2]), ([4], 0, [3]), ([6, 7], 2, [4])]
    ref = ForwardBatch.build(ForwardMode.DRAFT, seqs, 4)
    plan = StepPlan(mode="draft", seqs=[seq_plan(*seqs[0], logits_row=1), seq_plan(*seqs[1], want_logits=False),
                                        seq_plan(*seqs[2])])
    got = to_batch(plan, 4, "cpu")
    assert got.logits_indices.tolist() == [1, 5]  # row 1 of seq 0; seq 1 none; the last row of seq 2
    got.validate(4)
    empty = dataclasses_replace_logits(ref)
    for batch, want in ((got, ref), (to_device(empty, "cpu"), empty)):
        for name in ("input_ids", "positions", "query_lens", "prefix_lens", "seq_lens", "query_start_loc",
                     "page_table", "slot_mapping"):
            a, b = getattr(batch, name), getattr(want, name)
            assert torch.equal(a, b) and a.dtype == b.dtype and a.data_ptr() % 16 == 0, name
    assert to_device(empty, "cpu").logits_indices.shape == (0,)


def dataclasses_replace_logits(batch):
    import dataclasses

    return dataclasses.replace(batch, logits_indices=torch.zeros(0, dtype=torch.int64))
