"""Prefill admission + chunking: token budget, several prompts per step, FIFO, page accounting."""

from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.shared.protocol import SamplingParams
from glmserve.prefill_worker.pusher import Pusher
from glmserve.prefill_worker.scheduler import PrefillScheduler, PrefillSeq


def _seq(rid: str, n: int, page_size: int = 4) -> PrefillSeq:
    return PrefillSeq(rid, list(range(3, 3 + n)), SamplingParams(), "d0", list(range(100, 100 + (n + page_size - 1) // page_size)))


def test_chunks_respect_budget_and_pack_several_prompts():
    pages = PageAllocator(64)
    s = PrefillScheduler(pages, page_size=4, token_budget=10)
    for rid, n in [("a", 7), ("b", 12), ("c", 2)]:
        s.add(_seq(rid, n))
    steps = []
    while s.num_queued():
        chunks = s.schedule()
        assert sum(c.length for c in chunks) <= 10
        steps.append([(c.seq.rid, c.start, c.length) for c in chunks])
    assert steps == [[("a", 0, 7), ("b", 0, 3)], [("b", 3, 9), ("c", 0, 1)], [("c", 1, 1)]]
    assert pages.num_used == 2 + 3 + 1  # whole prompts' pages were allocated at admission
    for rid in "abc":
        pages.release(rid)
    assert pages.num_used == 0 and not pages.check_idle()


def test_admission_waits_for_pages_fifo():
    pages = PageAllocator(4)  # 3 usable pages (page 0 is the dummy)
    s = PrefillScheduler(pages, page_size=4, token_budget=100)
    s.add(_seq("big", 9))  # 3 pages
    s.add(_seq("small", 2))  # 1 page: must not overtake once big waits
    assert [c.seq.rid for c in s.schedule()] == ["big"]
    s.add(_seq("big2", 9))
    assert s.schedule() == []  # small waits for a page
    pages.release("big")
    assert [c.seq.rid for c in s.schedule()] == ["small"]  # big2 needs 3 pages, 2 are left
    assert [x.rid for x in s.waiting] == ["big2"] and pages.num_used == 1


def test_abort_waiting_and_started():
    pages = PageAllocator(16)
    s = PrefillScheduler(pages, page_size=4, token_budget=4)
    s.add(_seq("a", 10))
    s.add(_seq("b", 5))
    s.schedule()  # a: 4 of 10
    assert s.abort("b").aborted and s.abort("a").aborted
    assert s.schedule() == [] and s.num_queued() == 0 and s.queued_tokens() == 0
    assert s.abort("zzz") is None


def test_pusher_sends_complete_pages_then_last_with_hidden():
    pages = PageAllocator(16)
    s = PrefillScheduler(pages, page_size=4, token_budget=6)
    seq = _seq("a", 10)  # pages: 3 (4 + 4 + 2 tokens)
    s.add(seq)
    pusher = Pusher("p0", page_size=4, page_bytes=1000)
    s.schedule()  # 6 tokens -> 1 complete page
    p1 = pusher.push(seq, hidden_row=5)
    assert p1.announce.chunk_index == 0 and not p1.announce.is_last and p1.op.hidden_row == -1
    assert list(seq.decode_page_ids[:1]) == [100] and p1.op.xfer_id == "a/0"
    s.schedule()  # 10 tokens: done
    p2 = pusher.push(seq, hidden_row=3)
    assert p2.announce.is_last and p2.announce.has_hidden and p2.op.hidden_row == 3
    from glmserve.shared.protocol import unpack_ids
    assert unpack_ids(p2.announce.page_ids) == [101, 102] and unpack_ids(p2.op.page_ids) == seq.page_ids[1:]
    assert pusher.releasable() == []  # sends not completed yet
    pusher.done_xfer("a", "a/0")
    pusher.done_xfer("a", "a/1")
    assert [e.seq.rid for e in pusher.releasable()] == ["a"] and not pusher.inflight
