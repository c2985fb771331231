"""Logits parity with transformers (fp32, CPU): batched prefill, 16 greedy decode steps through the paged
cache (page size 4, scattered pages), and chunked prefill mixed with other sequences."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from tests.models.helpers import Pages, hf_logits, rel_err, step

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]]
PAGE = 4


ARCHS = ["glm4_moe", "glm4_moe_lite", "glm4_moe_lite-expanded"]


def _load(tiny_dirs, arch: str, monkeypatch):
    """arch "glm4_moe_lite-expanded": every PREFILL batch takes MLA's expanded form (decompressed K/V;
    by default only queries of >= EXPAND_MIN_Q tokens do, longer than these prompts), "glm4_moe_lite"
    the absorbed form; both must match transformers."""
    import glmserve.shared.model.layers.mla as mla

    model_dir = tiny_dirs[arch.removesuffix("-expanded")]
    monkeypatch.setattr(mla, "EXPAND_MIN_Q", 1 if arch.endswith("-expanded") else 10**9)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    runner = ModelRunner(model_dir, dtype=torch.float32)
    kv = PagedKVCache(runner.kv_layout(PAGE), num_pages=64)
    return hf, runner, kv


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_greedy_decode(tiny_dirs, arch, monkeypatch):
    hf, runner, kv = _load(tiny_dirs, arch, monkeypatch)
    pages = Pages(64, PAGE)
    out = step(runner.forward, pages, [(i, p, 0) for i, p in enumerate(PROMPTS)], ForwardMode.PREFILL, kv)
    assert out.hidden.shape == (sum(map(len, PROMPTS)), runner.config.hidden_size)
    seqs = [list(p) for p in PROMPTS]
    worst = 0.0
    for it in range(17):
        for i, seq in enumerate(seqs):
            ref = hf_logits(hf, seq)
            worst = max(worst, rel_err(out.logits[i], ref))
            assert int(out.logits[i].argmax()) == int(ref.argmax()), f"greedy token differs at step {it} seq {i}"
        if it == 16:
            break
        nxt = [int(t) for t in out.logits.argmax(-1)]
        chunks = [(i, [tok], len(seq)) for i, (seq, tok) in enumerate(zip(seqs, nxt))]
        out = step(runner.forward, pages, chunks, ForwardMode.DECODE, kv)
        for seq, tok in zip(seqs, nxt):
            seq.append(tok)
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(tiny_dirs, arch, monkeypatch):
    hf, runner, kv = _load(tiny_dirs, arch, monkeypatch)
    pages = Pages(64, PAGE)
    done = [0] * len(PROMPTS)
    last = {}
    while min(d - len(p) for d, p in zip(done, PROMPTS)) < 0:  # chunks of 5 (not page aligned), all seqs at once
        chunks = [(i, p[done[i]: done[i] + 5], done[i]) for i, p in enumerate(PROMPTS) if done[i] < len(p)]
        out = step(runner.forward, pages, chunks, ForwardMode.PREFILL, kv)
        for row, (i, ids, prefix) in enumerate(chunks):
            done[i] = prefix + len(ids)
            last[i] = (out.logits[row], done[i])
    for i, p in enumerate(PROMPTS):
        logits, n = last[i]
        assert n == len(p)
        assert rel_err(logits, hf_logits(hf, p)) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_decode_and_prefill_batch(tiny_dirs, arch, monkeypatch):
    """One batch holding a decode row of one sequence and a whole prompt of another (VERIFY-style all rows)."""
    hf, runner, kv = _load(tiny_dirs, arch, monkeypatch)
    pages = Pages(64, PAGE)
    first = step(runner.forward, pages, [(0, PROMPTS[0], 0)], ForwardMode.PREFILL, kv)
    tok = int(first.logits[0].argmax())
    seqs = [(0, [tok], len(PROMPTS[0])), (1, PROMPTS[2], 0)]
    batch_pages = [(ids, prefix, list(pages.ensure(sid, prefix + len(ids)))) for sid, ids, prefix in seqs]
    batch = ForwardBatch.build(ForwardMode.PREFILL, batch_pages, PAGE, logits_rows="all")
    out = runner.forward(batch, kv)
    assert out.logits.shape[0] == 1 + len(PROMPTS[2])
    assert rel_err(out.logits[0], hf_logits(hf, PROMPTS[0] + [tok])) <= 1e-4
    for j in range(len(PROMPTS[2])):  # every row of the prompt: logits of its prefix
        assert rel_err(out.logits[1 + j], hf_logits(hf, PROMPTS[2][: j + 1])) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_rows_over_cached_prefix(tiny_dirs, arch, monkeypatch):
    """VERIFY: K+1 tokens per sequence on top of a cached prefix, logits at every row."""
    hf, runner, kv = _load(tiny_dirs, arch, monkeypatch)
    pages = Pages(64, PAGE)
    step(runner.forward, pages, [(i, p, 0) for i, p in enumerate(PROMPTS)], ForwardMode.PREFILL, kv)
    drafts = [[50 + i, 60 + i, 70 + i] for i in range(len(PROMPTS))]
    rows = [(i, d, len(p)) for i, (p, d) in enumerate(zip(PROMPTS, drafts))]
    batch = ForwardBatch.build(ForwardMode.VERIFY, [(d, pre, list(pages.ensure(i, pre + len(d)))) for i, d, pre in rows],
                               PAGE, logits_rows="all")
    out = runner.forward(batch, kv)
    assert out.logits.shape[0] == 3 * len(PROMPTS)
    for i, (p, d) in enumerate(zip(PROMPTS, drafts)):
        for j in range(3):
            assert rel_err(out.logits[3 * i + j], hf_logits(hf, p + d[: j + 1])) <= 1e-4
