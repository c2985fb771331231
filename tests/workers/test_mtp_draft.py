"""The MTP draft the decode makes after a chunked prefill equals a direct computation (spec §3.2).

In one process with the real Engine: prefill a prompt in chunks with the prefill worker's MTP rows
(plan.mtp_ids), seed the decode state from the last hidden state, draft with decode_worker.mtp; the
reference runs the target over the whole prompt at once and the MTP layer over every row
(h_p, x_{p+1}) on a fresh cache. Equal MTP logits prove the chunk-boundary MTP KV is right (the
fleet test can't: drafts only change speed there)."""

from __future__ import annotations

import time

import pytest
import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.worker_common.config import common_parser, worker_config
from glmserve.shared.worker_common.engine import Engine
from glmserve.shared.worker_common.plan import StepPlan, seq_plan
from glmserve.shared.worker_common.tp import TPFanout
from glmserve.decode_worker import mtp
from glmserve.decode_worker.state import DecodeSeq


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_draft_after_chunked_prefill_equals_direct_mtp(tmp_path, arch):
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), arch, seed=4)
    a = common_parser("decode").parse_args(["--model_dir", model_dir, "--control_addr", "tcp://127.0.0.1:1",
                                            "--router_addr", "tcp://127.0.0.1:2", "--page_size", "4",
                                            "--num_pages", "32", "--mtp_step", "1"])
    engine = Engine(worker_config("decode", a), TPFanout(0, 1, 0, "cpu"))
    prompt = [(13 * i + 5) % 250 + 3 for i in range(23)]
    pages = list(range(1, 8))
    out = None
    for start in range(0, len(prompt), 8):  # chunks of 8: boundaries inside pages and across them
        end = min(start + 8, len(prompt))
        mtp_ids = prompt[start + 1 : min(end, len(prompt) - 1) + 1]
        out = engine.run(StepPlan(mode="prefill", seqs=[seq_plan(prompt[start:end], start, pages, True, mtp_ids)]))
    first = int(out.logits[0].argmax())
    seq = DecodeSeq("r", len(prompt), prompt + [first], SamplingParams(temperature=0), pages, "p0", time.monotonic())
    seq.num_cached, seq.hidden = len(prompt), out.hidden[-1].clone()
    mtp.seed_rows(seq)
    plan = StepPlan(mode="draft", seqs=[seq_plan([t for _, t in seq.mtp_rows], seq.mtp_rows[0][0], pages)])
    got = engine.run(plan, prev_hidden=seq.mtp_hidden).logits[0]

    runner = engine.runner
    cache = PagedKVCache(runner.kv_layout(4), 32)
    full = ForwardBatch.build(ForwardMode.PREFILL, [(prompt, 0, pages)], 4)
    hidden = runner.forward(full, cache).hidden
    rows = ForwardBatch.build(ForwardMode.DRAFT, [(prompt[1:] + [first], 0, pages)], 4)
    ref = runner.mtp_forward(rows, rows.input_ids, hidden, cache).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert mtp.draft(engine, [seq], [], 1) == [[int(ref.argmax())]]


@pytest.mark.parametrize("chain_normed", [False, True])
def test_chained_drafts_follow_the_chosen_chaining(tmp_path, chain_normed):
    """K = 3: draft 2 and 3 equal a direct chain where the MTP layer's next "previous hidden" is its
    own block output (vanilla_with_att, vLLM) or that output after shared_head.norm (eagle_with_att,
    SGLang EAGLE); the two modes give different draft logits."""
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe", seed=6)
    a = common_parser("decode").parse_args(["--model_dir", model_dir, "--control_addr", "tcp://127.0.0.1:1",
                                            "--router_addr", "tcp://127.0.0.1:2", "--page_size", "4",
                                            "--num_pages", "32", "--mtp_step", "3"])
    engine = Engine(worker_config("decode", a), TPFanout(0, 1, 0, "cpu"))
    runner = engine.runner
    prompt, pages = [(7 * i + 3) % 250 + 3 for i in range(9)], list(range(1, 8))
    out = engine.run(StepPlan(mode="prefill", seqs=[seq_plan(prompt, 0, pages, True, prompt[1:])]))
    first = int(out.logits[0].argmax())
    seq = DecodeSeq("r", len(prompt), prompt + [first], SamplingParams(temperature=0), pages, "p0", time.monotonic())
    seq.num_cached, seq.hidden = len(prompt), out.hidden[-1].clone()
    mtp.seed_rows(seq)
    seen, lead = [], engine.lead

    def recording_lead(plan, prev_hidden=None):  # keeps each draft pass's logits
        out = lead(plan, prev_hidden)
        seen.append(out.logits[0].clone())
        return out

    engine.lead = recording_lead
    got = mtp.draft(engine, [seq], [], 3, chain_normed=chain_normed)[0]

    def chain(normed: bool):
        """The reference chain, row by row on the same cache (the passes rewrite the same slots)."""
        z, tok, toks, logits = seq.hidden[None, :], first, [], []
        for j in range(3):
            b = ForwardBatch.build(ForwardMode.DRAFT, [([tok], len(prompt) - 1 + j, pages)], 4)
            o = runner.mtp_forward(b, b.input_ids, z, engine.cache)
            tok = int(o.logits[0].argmax())
            toks.append(tok)
            logits.append(o.logits[0])
            z = runner.model.mtp_head_norm(o.hidden) if normed else o.hidden
        return toks, logits

    ref, ref_logits = chain(chain_normed)
    _, other_logits = chain(not chain_normed)
    assert got == ref
    for a, b in zip(seen, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref_logits[1], other_logits[1], rtol=1e-3, atol=1e-3)  # the modes really differ


def test_accept_greedy_longest_agreeing_prefix():
    assert mtp.accept_greedy([7], [4]) == 1  # no drafts: the target token only
    assert mtp.accept_greedy([7, 4, 9, 1], [4, 9, 2, 5]) == 3  # d1, d2 accepted, d3 != t2 -> t0, t1, t2
    assert mtp.accept_greedy([7, 4, 9], [4, 9, 6]) == 3  # all accepted + bonus t2
    assert mtp.accept_greedy([7, 5, 9], [4, 9, 6]) == 1  # first draft rejected -> t0 only
