"""Decode side: reservations, ordered pushes, abort while in flight, running set page growth."""

import pytest

from glmserve.shared import protocol as P
from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.decode_worker.handoff import Handoffs
from glmserve.decode_worker.running import RunningSet
from glmserve.decode_worker.state import Phase, finish_reason


def _reserve(h, rid, n_prompt, max_new=8):
    return h.reserve(P.Reserve(rid=rid, prompt_ids=P.pack_ids(list(range(5, 5 + n_prompt))),
                               sampling=P.SamplingParams(max_new_tokens=max_new), prefill_id="p0"))


def _chunk(seq, k, lo, hi, n_tokens, last=False):
    return P.KVChunkReady(rid=seq.rid, prefill_id="p0", page_ids=P.pack_ids(seq.page_ids[lo:hi]), num_tokens=n_tokens,
                          is_last=last, chunk_index=k, has_hidden=last)


def _first(seq, tok, finished=False):
    return P.FirstToken(rid=seq.rid, prefill_id="p0", token_id=tok, finished=finished)


def test_reserve_allowance_and_busy():
    pages = PageAllocator(9)  # 8 usable
    h = Handoffs(pages, page_size=4, max_running=3, reserve_cap=4, deadline_s=5)
    seq = _reserve(h, "a", 10, max_new=100)  # 10 + min(100, 4) = 14 tokens -> 4 pages
    assert len(seq.page_ids) == 4 and pages.num_used == 4
    assert _reserve(h, "a", 1) == "duplicate request id"
    assert _reserve(h, "b", 17) == "not enough free KV pages" and pages.num_used == 4
    with pytest.raises(ValueError, match="needs 9 KV pages"):
        _reserve(h, "never", 30)  # could never fit: an error, not Busy forever
    _reserve(h, "c", 1), _reserve(h, "d", 1)
    assert "max_running" in _reserve(h, "e", 1)


def test_pushes_then_run_then_finish():
    pages = PageAllocator(32)
    h = Handoffs(pages, page_size=4, max_running=8, reserve_cap=8, deadline_s=5)
    seq = _reserve(h, "a", 6, max_new=3)
    assert h.on_chunk(_chunk(seq, 0, 0, 1, 4)) is None
    assert h.on_chunk(_chunk(seq, 0, 0, 1, 4)) is not None  # replayed chunk index is refused
    assert h.on_chunk(_chunk(seq, 1, 1, 2, 6, last=True)) is None
    assert [op.kind for op in h.ops] == ["recv", "recv"] and h.ops[1].hidden_row == 1
    assert h.ready_to_finish() == []  # recvs still pending
    seq.pending_xfers.clear()
    assert h.ready_to_finish() == []  # every push in, but the first token not yet
    h.on_first_token(_first(seq, 42))
    assert h.ready_to_finish() == [seq] and not h.seqs
    run = RunningSet(pages, 4)
    run.add(seq)
    assert seq.phase == Phase.RUNNING and seq.token_ids[-1] == 42 and seq.num_cached == 6
    eos = frozenset({1})
    for tok in (7, 8):
        batch, victim = run.schedule()
        assert batch == [seq] and victim is None
        plan = run.plan_for(batch)
        assert P.unpack_ids(plan.seqs[0].token_ids) == [seq.token_ids[-1]] and plan.seqs[0].prefix_len == seq.num_cached
        run.commit(seq, [tok])
    assert finish_reason(seq, eos) == "length" and seq.num_output == 3


def test_abort_in_flight_releases_after_recv_and_drains_later_pushes():
    pages = PageAllocator(32)
    h = Handoffs(pages, page_size=4, max_running=8, reserve_cap=8, deadline_s=5)
    seq = _reserve(h, "a", 9)
    h.on_chunk(_chunk(seq, 0, 0, 2, 8))
    h.abort("a")
    assert h.ready_to_finish() == []  # the posted recv must finish first
    h.on_chunk(_chunk(seq, 1, 2, 3, 9, last=True))
    h.on_first_token(_first(seq, 5))  # ignored: aborted
    assert h.ops[-1].kind == "drain"  # late push after abort never lands in our pages
    seq.pending_xfers.clear()
    assert h.ready_to_finish() == [seq] and seq.aborted and seq.token_ids[-1] != 5
    assert pages.release("a") > 0 and pages.release("a") == 0


def test_first_token_before_the_last_recv_and_first_finished():
    """The first token may come before the last recv completes; a first token that ended the
    request (max_new_tokens=1, EOS) hands over nothing to run: the worker releases it."""
    pages = PageAllocator(32)
    h = Handoffs(pages, page_size=4, max_running=8, reserve_cap=8, deadline_s=5)
    seq = _reserve(h, "a", 4)
    h.on_chunk(_chunk(seq, 0, 0, 1, 4, last=True))
    h.on_first_token(_first(seq, 7, finished=True))
    h.on_first_token(_first(seq, 8))  # a duplicate never appends twice
    assert h.ready_to_finish() == []  # the recv is still in flight
    seq.pending_xfers.clear()
    assert h.ready_to_finish() == [seq] and seq.first_finished and seq.token_ids[-1] == 7 and seq.num_output == 1


def test_page_growth_and_stall_victim():
    pages = PageAllocator(3)  # 2 usable
    run = RunningSet(pages, page_size=2)
    h = Handoffs(pages, 2, 8, reserve_cap=0, deadline_s=5)
    a = _reserve(h, "a", 1)
    b = _reserve(h, "b", 1)
    for s in (a, b):
        s.token_ids.append(9)
        run.add(s)
    batch, victim = run.schedule()
    assert batch == [a, b] and victim is None
    for s in batch:
        run.commit(s, [10])  # now 3 tokens, next position 2 needs a second page: none free
    batch, victim = run.schedule()
    assert batch == [] and victim is b  # newest fails so the other can go on
    run.remove("b"), pages.release("b")
    assert run.schedule() == ([a], None) and len(a.page_ids) == 2


def test_finish_reasons():
    pages = PageAllocator(8)
    h = Handoffs(pages, 4, 8, 8, 5)
    s = _reserve(h, "a", 2, max_new=10)
    s.token_ids.append(1)
    assert finish_reason(s, frozenset({1})) == "stop"
    s.sampling.ignore_eos = True
    assert finish_reason(s, frozenset({1})) is None
    s.sampling.stop_token_ids = [1]
    assert finish_reason(s, frozenset()) == "stop"


def test_abort_between_pushes_releases_at_once():
    """Aborted while RECEIVING with nothing in flight (e.g. the prefill died): free now, drain later pushes."""
    pages = PageAllocator(32)
    h = Handoffs(pages, page_size=4, max_running=8, reserve_cap=8, deadline_s=5)
    seq = _reserve(h, "a", 12)
    h.on_chunk(_chunk(seq, 0, 0, 1, 4))
    seq.pending_xfers.clear()  # the first push completed
    assert h.ready_to_finish() == []  # not aborted: waits for the next push
    h.abort("a")
    assert h.ready_to_finish() == [seq] and not h.seqs
    h.on_chunk(_chunk(seq, 1, 1, 3, 12, last=True))
    assert h.ops[-1].kind == "drain" and h.ops[-1].xfer_id == "a/1"


def test_handoff_deadline_expires_only_without_recvs_in_flight():
    pages = PageAllocator(32)
    h = Handoffs(pages, page_size=4, max_running=8, reserve_cap=8, deadline_s=0.0)
    seq = _reserve(h, "a", 5)
    h.on_chunk(_chunk(seq, 0, 0, 1, 4))
    assert h.expired() == []  # a recv is posted: never free pages under it
    seq.pending_xfers.clear()
    assert h.expired() == [seq] and not h.seqs
