"""Handoff state machine: forward-only states, deadlines, idempotent release, abort in flight.

Unit tests drive a scripted KVLink (each transfer's state set by the test, a fake clock); the
last two run a real gloo link between two threads of this process.
"""

import socket

import pytest

from shared.kvcache.allocator import PageAllocator
from shared.kvcache.cache import PagedKVCache
from shared.kvcache.handoff import Handoff, HandoffState, HandoffTable
from shared.kvcache.link import KVLink, LinkStats, XferState
from shared.kvcache.rendezvous import accept_link, connect_link, in_background, open_store

from . import kv_peer as P

S = HandoffState


class ScriptedLink(KVLink):
    """Transfers stay PENDING until the test finishes them; records aborts and teardown."""

    def __init__(self):
        self.name, self.broken, self.error, self.stats = "scripted", False, "", LinkStats()
        self.states: dict[str, XferState] = {}
        self.aborted: set[str] = set()

    def post(self, xfer_id):
        self.states[xfer_id] = XferState.PENDING

    send_pages = recv_pages = lambda self, xfer_id, *a, **k: self.post(xfer_id)
    send_tensor = recv_tensor = lambda self, xfer_id, *a, **k: self.post(xfer_id)

    def finish(self, xfer_id):
        self.states[xfer_id] = XferState.ABORTED if xfer_id in self.aborted else XferState.DONE

    def poll(self, xfer_id):
        return self.states.get(xfer_id, XferState.UNKNOWN)

    def wait(self, xfer_id, timeout_s=None):
        return self.poll(xfer_id)

    def abort(self, xfer_id):
        self.aborted.add(xfer_id)

    def forget(self, xfer_id):
        self.states.pop(xfer_id, None)

    def num_pending(self):
        return sum(s is XferState.PENDING for s in self.states.values())

    def teardown(self, reason):
        self.broken, self.error = True, reason
        for x, s in self.states.items():
            if s is XferState.PENDING:
                self.states[x] = XferState.FAILED


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def table(release_on_done: bool, clock=None, pages: int = 16):
    alloc = PageAllocator(pages)
    return alloc, HandoffTable(alloc, release_on_done, reserve_timeout_s=10, transfer_timeout_s=5, clock=clock or Clock())


def test_states_only_move_forward():
    h = Handoff("r", S.RESERVED, 0.0)
    h.advance(S.TRANSFERRING)
    with pytest.raises(ValueError):
        h.advance(S.RESERVED)
    h.advance(S.DONE)
    for to in (S.FAILED, S.ABORTED, S.DONE):
        with pytest.raises(ValueError):
            h.advance(to)


def test_sender_frees_source_pages_only_after_every_send_completed():
    alloc, t = table(release_on_done=True)
    link = ScriptedLink()
    alloc.alloc_for("r", 3)
    t.open("r")
    link.post("r/0"), t.posted("r", link, "r/0")
    link.post("r/1"), t.posted("r", link, "r/1", last=True)
    link.finish("r/1")
    assert t.poll() == [] and alloc.num_used == 3  # r/0 still in flight: pages held
    link.finish("r/0")
    [h] = t.poll()
    assert h.state is S.DONE and alloc.num_used == 0
    assert t.release("r") == 0 and t.check_idle() == []


def test_receiver_keeps_pages_on_done_and_release_is_idempotent():
    alloc, t = table(release_on_done=False)
    link = ScriptedLink()
    alloc.alloc_for("r", 2)
    t.open("r")
    link.post("r/0"), t.posted("r", link, "r/0", last=True)
    link.finish("r/0")
    [h] = t.poll()
    assert h.state is S.DONE and alloc.num_used == 2  # the decode now runs the request
    assert t.release("r") == 2 and t.release("r") == 0 and t.release(h) == 0
    assert alloc.check_idle() == []


def test_abort_in_flight_lets_the_transfer_finish_then_frees():
    alloc, t = table(release_on_done=False)
    link = ScriptedLink()
    alloc.alloc_for("r", 2)
    t.open("r")
    link.post("r/0"), t.posted("r", link, "r/0")
    t.abort("r", "client disconnected")
    assert "r/0" in link.aborted
    assert t.poll() == [] and alloc.num_used == 2  # still in flight: nothing freed
    link.finish("r/0")
    [h] = t.poll()
    assert h.state is S.ABORTED and h.reason == "client disconnected" and alloc.num_used == 0
    assert not link.broken


def test_abort_with_nothing_in_flight_is_immediate():
    alloc, t = table(release_on_done=False)
    alloc.alloc_for("r", 2)
    t.open("r")
    t.abort("r")
    [h] = t.poll()
    assert h.state is S.ABORTED and alloc.num_used == 0
    assert t.abort("r") is None  # already gone: a second abort is a no-op


def test_reserved_deadline_fails_and_frees_without_touching_links():
    clock = Clock()
    alloc, t = table(release_on_done=False, clock=clock)
    alloc.alloc_for("r", 4)
    t.open("r")
    clock.t = 9.9
    assert t.poll() == []
    clock.t = 10.1
    [h] = t.poll()
    assert h.state is S.FAILED and h.reason == "timeout in RESERVED" and alloc.num_used == 0


def test_transfer_deadline_tears_link_down_before_pages_are_released():
    clock = Clock()
    alloc, t = table(release_on_done=True, clock=clock)
    link = ScriptedLink()
    alloc.alloc_for("a", 1), alloc.alloc_for("b", 1)
    t.open("a"), t.open("b")
    link.post("a/0"), t.posted("a", link, "a/0", last=True)
    clock.t = 3.0
    link.post("b/0"), t.posted("b", link, "b/0", last=True)  # b's deadline is later
    clock.t = 5.5
    ha, hb = t.poll()  # a timed out; b's transfer died with the torn-down link
    assert ha.rid == "a" and ha.state is S.FAILED and ha.reason == "timeout in TRANSFERRING"
    assert link.broken and "timed out" in link.error
    assert hb.state is S.FAILED and "failed" in hb.reason and alloc.num_used == 0


def test_transfer_deadline_moves_with_each_post():
    clock = Clock()
    alloc, t = table(release_on_done=True, clock=clock)
    link = ScriptedLink()
    t.open("r")
    for i in range(4):
        clock.t = 4.0 * i
        link.post(f"r/{i}"), t.posted("r", link, f"r/{i}")
        link.finish(f"r/{i}")
        assert t.poll() == []  # not closed: more will come; never past a deadline
    t.close("r")
    assert [h.state for h in t.poll()] == [S.DONE]


def test_posting_after_the_last_transfer_is_refused():
    _, t = table(release_on_done=True)
    link = ScriptedLink()
    t.open("r")
    t.posted("r", link, "r/0", last=True)
    with pytest.raises(ValueError, match="after the last"):
        t.posted("r", link, "r/1")
    with pytest.raises(ValueError, match="already open"):
        t.open("r")


def _gloo_pair(xfer_timeout_s: float):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = open_store("127.0.0.1", port, is_host=True)
    sig = P.signature(P.GQA)
    fut = in_background(accept_link, host, "p", "d", 0, sig, "cpu", 20.0, xfer_timeout_s)
    send = connect_link(open_store("127.0.0.1", port, False), "p", "d", 0, sig, "cpu", 20.0, xfer_timeout_s)
    return send, fut.result(20)


def test_real_link_abort_in_flight_then_free_and_pages_untouched():
    send, recv = _gloo_pair(20.0)
    alloc = PageAllocator(P.NUM_PAGES)
    t = HandoffTable(alloc, release_on_done=False)
    cache = PagedKVCache(P.GQA, P.NUM_PAGES)
    ids = alloc.alloc_for("r", 2)
    t.open("r")
    recv.recv_pages("r/0", cache, ids)
    t.posted("r", recv, "r/0", last=True)
    t.abort("r")
    assert t.poll() == [] and alloc.num_used == 2
    send.send_pages("r/0", P.filled_cache(P.GQA, seed=9), [3, 4])
    assert recv.wait("r/0", 20) is XferState.ABORTED
    [h] = t.poll()
    assert h.state is S.ABORTED and alloc.num_used == 0
    assert bool((cache.buffer == 0).all())  # the aborted recv never wrote the pages
    send.close(), recv.close()


def test_real_link_timeout_tears_down_then_frees():
    send, recv = _gloo_pair(20.0)
    alloc = PageAllocator(P.NUM_PAGES)
    t = HandoffTable(alloc, release_on_done=False, transfer_timeout_s=0.3)
    cache = PagedKVCache(P.GQA, P.NUM_PAGES)
    t.open("r")
    recv.recv_pages("r/0", cache, alloc.alloc_for("r", 1))
    t.posted("r", recv, "r/0", last=True)
    import time

    time.sleep(0.4)
    [h] = t.poll()
    assert h.state is S.FAILED and recv.broken and alloc.num_used == 0
    send.close()
