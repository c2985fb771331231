"""Decode graph buckets: a DECODE batch (or a VERIFY batch of q tokens per sequence) padded to its bucket
(pad rows on the dummy page 0) gives the same logits/hidden as the eager batch and writes no real page
differently. On CPU the padded path runs eagerly; on CUDA (gpu test) it replays captured graphs. The gpu
tests also run the eager DECODE/MTP forwards under torch's sync debug mode (no host sync inside)."""

import pytest
import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner, graph_buckets

PAGE = 4


def _decode_batch(num_seqs: int, gen: torch.Generator, device="cpu", q: int = 1) -> ForwardBatch:
    seqs = []
    for i in range(num_seqs):
        prefix = int(torch.randint(1, 15 - q, (1,), generator=gen))
        pages = [1 + 4 * i + j for j in range(4)]  # pages 1..; page 0 is the dummy page
        seqs.append((torch.randint(3, 200, (q,), generator=gen).tolist(), prefix, pages))
    mode = ForwardMode.DECODE if q == 1 else ForwardMode.VERIFY
    return ForwardBatch.build(mode, seqs, PAGE, logits_rows="last" if q == 1 else "all", device=device)


def _check(model_dir, device, dtype, tol, q: int = 1):
    runner = ModelRunner(model_dir, device=device, dtype=dtype)
    kv = PagedKVCache(runner.kv_layout(PAGE), 48, device)
    gen = torch.Generator().manual_seed(0)
    kv.buffer.normal_(generator=None)  # arbitrary prefix KV already in every page
    assert runner.capture_decode_graphs(kv, max_batch_size=10, max_seq_len=16, tokens_per_seq=q) == [1, 2, 4, 8, 10]
    key = (ForwardMode.DECODE if q == 1 else ForwardMode.VERIFY, q)
    for num_seqs in (1, 3, 5, 9):
        batch = _decode_batch(num_seqs, gen, device, q)
        graphs = runner.graph_sets.pop(key)
        before = kv.buffer.clone()
        want = runner.forward(batch, kv)
        eager_cache = kv.buffer.clone()
        kv.buffer.copy_(before)
        runner.graph_sets[key] = graphs
        assert graphs.fits(batch, kv) and not graphs.fits(_decode_batch(2, gen, device, q + 1), kv)
        got = runner.forward(batch, kv)
        real, ref = kv.buffer[:, :, 1:].float(), eager_cache[:, :, 1:].float()  # real pages: same writes
        assert float((real - ref).abs().max()) <= tol * float(ref.abs().max())
        for a, b in ((got.logits, want.logits), (got.hidden, want.hidden)):
            assert a.shape == b.shape
            assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) <= tol


def test_graph_buckets():
    assert graph_buckets(1) == [1] and graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_padded_decode_equals_eager_cpu(tiny_dirs, arch):
    _check(tiny_dirs[arch], "cpu", torch.float32, 1e-5)


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_padded_verify_equals_eager_cpu(tiny_dirs, arch):
    _check(tiny_dirs[arch], "cpu", torch.float32, 1e-5, q=3)


def test_long_or_prefill_batches_run_eagerly(tiny_dirs):
    runner = ModelRunner(tiny_dirs["glm4_moe"])
    kv = PagedKVCache(runner.kv_layout(PAGE), 48)
    runner.capture_decode_graphs(kv, max_batch_size=4, max_seq_len=8)
    long = ForwardBatch.build(ForwardMode.DECODE, [([5], 9, [1, 2, 3])], PAGE)
    prefill = ForwardBatch.build(ForwardMode.PREFILL, [([5, 6], 0, [1])], PAGE)
    wide = _decode_batch(5, torch.Generator().manual_seed(1))
    assert not any(runner.graphs.fits(b, kv) for b in (long, prefill, wide))
    assert not runner.graphs.fits(_decode_batch(2, torch.Generator()), PagedKVCache(runner.kv_layout(PAGE), 48))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("q", [1, 3])
def test_cuda_graph_replay_equals_eager(tiny_dirs, arch, q):
    _check(tiny_dirs[arch], "cuda", torch.bfloat16, 2e-2, q)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_cuda_decode_forward_has_no_host_sync(tiny_dirs, arch, quantization):
    """The eager DECODE forward (and the MTP draft forward) of the CUDA path never waits on the device:
    torch's sync debug mode turns any .item()/.tolist()/nonzero/D2H copy inside it into an error (graph
    capture would fail on the same ops). Expert-usage tracking stays on: it must not sync either."""
    runner = ModelRunner(tiny_dirs[arch], device="cuda", dtype=torch.bfloat16, quantization=quantization)
    kv = PagedKVCache(runner.kv_layout(PAGE), 48, "cuda")
    runner.track_expert_usage()
    batch = _decode_batch(5, torch.Generator().manual_seed(2), "cuda")  # built (H2D copies) before the check
    hidden = torch.randn(5, runner.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # Triton compiles and caches launch configs on the first calls
        runner.forward(batch, kv)
        runner.mtp_forward(batch, batch.input_ids, hidden, kv)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner.forward(batch, kv)
        draft = runner.mtp_forward(batch, batch.input_ids, hidden, kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.logits.shape == (5, runner.config.vocab_size) and torch.isfinite(out.logits).all()
    assert torch.isfinite(draft.logits).all()
