"""The send gate and late posting over gloo (in-process pair, two threads; CPU).

The GPU failure this pins: an end that posts a send and then blocks its own thread on the GPU
(a device-wide sync behind the spinning NCCL send) before it tells the peer to post the recv.
With the gate, a send reaches the backend only after the peer committed the matching recv.
"""

import threading
import time

import pytest

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.link import XferState
from glmserve.shared.kvcache.rendezvous import accept_link, connect_link, in_background, open_store
from glmserve.shared.ports import free_port
from tests.kvcache import kv_peer as P

pytestmark = pytest.mark.timeout(60)


def _pair(name: str, xfer_timeout_s: float, monkeypatch, gate: str):
    monkeypatch.setenv("KVLINK_SEND_GATE", gate)
    port = free_port()
    host = open_store("127.0.0.1", port, is_host=True)
    fut = in_background(accept_link, host, name, "d0", 0, P.signature(P.GQA), "cpu", 20.0, xfer_timeout_s)
    send = connect_link(open_store("127.0.0.1", port, False), name, "d0", 0, P.signature(P.GQA), "cpu", 20.0,
                        xfer_timeout_s)
    return send, fut.result(20)


@pytest.mark.parametrize("gate", ["0", "1"])
def test_send_posted_late_within_deadline_succeeds(monkeypatch, gate):
    """The decode posts its recv; the prefill posts the send 5 s later (deadline 8 s): DONE, bytes equal."""
    send, recv = _pair(f"late{gate}", 8.0, monkeypatch, gate)
    src, dst = P.filled_cache(P.GQA, seed=3), PagedKVCache(P.GQA, P.NUM_PAGES)
    recv.recv_pages("late/0", dst, [4, 5])
    time.sleep(5.0)
    send.send_pages("late/0", src, [1, 2])
    assert send.wait("late/0", 10) is XferState.DONE, send.error
    assert recv.wait("late/0", 10) is XferState.DONE, recv.error
    assert bool((dst.buffer[:, :, [4, 5]] == src.buffer[:, :, [1, 2]]).all())
    send.close(), recv.close()


def test_gated_send_waits_for_the_peers_recv(monkeypatch):
    """Gate on: a send posted before the peer's recv is not handed to the backend until that recv
    is posted; then both complete in order (pages, then the hidden tensor)."""
    send, recv = _pair("gated", 20.0, monkeypatch, "1")
    assert send.gate and recv.gate
    src, dst = P.filled_cache(P.GQA, seed=5), PagedKVCache(P.GQA, P.NUM_PAGES)
    hidden, out = P.hidden_of(9), P.hidden_of(0) * 0
    send.send_pages("g/0", src, [3])
    send.send_tensor("g/0/h", hidden)
    time.sleep(1.0)
    assert send._xfers["g/0"].work is None and send._xfers["g/0/h"].work is None  # still gated
    assert send.poll("g/0") is XferState.PENDING
    recv.recv_pages("g/0", dst, [7])
    recv.recv_tensor("g/0/h", out)
    assert [recv.wait(x, 10) for x in ("g/0", "g/0/h")] == [XferState.DONE] * 2, recv.error
    assert [send.wait(x, 10) for x in ("g/0", "g/0/h")] == [XferState.DONE] * 2, send.error
    assert bool((dst.buffer[:, :, 7] == src.buffer[:, :, 3]).all()) and bool((out == hidden).all())
    send.close(), recv.close()


def test_gated_send_without_recv_fails_at_deadline_and_says_why(monkeypatch, caplog):
    """Gate on, no recv ever posted: the send fails at its deadline, a WARNING names the reason,
    the transfer, its bytes and how long it waited, and the link is broken."""
    send, recv = _pair("nogate", 1.5, monkeypatch, "1")
    src = P.filled_cache(P.GQA, seed=6)
    with caplog.at_level("WARNING", logger="glmserve.shared.kvcache.link"):
        send.send_pages("n/0", src, [1, 2])
        assert send.wait("n/0", 10) is XferState.FAILED
        deadline = time.monotonic() + 5
        while "torn down" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert send.broken and "timed out after 1.5 s" in send.error
    nbytes = 2 * P.GQA.page_bytes() / 1e6
    assert f"send 'n/0' {nbytes:.1f} MB posted" in caplog.text and "(deadline;" in caplog.text
    assert "thread stacks at teardown" in caplog.text
    threading.Thread(target=recv.close, daemon=True).start()


class _ConnectInCall:
    """A process group whose first send/recv on each end returns only once the other end has
    entered its first send/recv too: NCCL's lazy p2p connect, which happens inside the call (a
    recv call on a fresh communicator blocks until the peer's send call). Gloo does not do this,
    so without the wrapper the gated warm-up's ordering is never exercised on CPU."""

    def __init__(self, pg, barrier: threading.Barrier):
        self._pg, self._barrier, self._connected = pg, barrier, False

    def _connect(self) -> None:
        if not self._connected:
            self._barrier.wait()  # BrokenBarrierError after its timeout, like NCCL's
            self._connected = True

    def send(self, tensors, dst, tag=0):
        self._connect()
        return self._pg.send(tensors, dst, tag)

    def recv(self, tensors, src, tag=0):
        self._connect()
        return self._pg.recv(tensors, src, tag)

    def __getattr__(self, name):
        return getattr(self._pg, name)


def test_gate_with_connect_in_call_backend(monkeypatch):
    """Gate on, over a backend that connects inside the first p2p call: the link's warm-up (the
    decode's recv, the prefill's gated send) must come up and a push must arrive. Counting the
    recv for the gate only after its backend call returned deadlocked exactly here on H200."""
    from glmserve.shared.kvcache import rendezvous

    barrier = threading.Barrier(2, timeout=5.0)
    make = rendezvous._make_group
    monkeypatch.setattr(rendezvous, "_make_group", lambda *a: _ConnectInCall(make(*a), barrier))
    send, recv = _pair("connect", 10.0, monkeypatch, "1")
    src, dst = P.filled_cache(P.GQA, seed=8), PagedKVCache(P.GQA, P.NUM_PAGES)
    send.send_pages("c/0", src, [2, 5])
    recv.recv_pages("c/0", dst, [1, 3])
    assert recv.wait("c/0", 10) is XferState.DONE and send.wait("c/0", 10) is XferState.DONE, (recv.error, send.error)
    assert bool((dst.buffer[:, :, [1, 3]] == src.buffer[:, :, [2, 5]]).all())
    send.close(), recv.close()


class _FailsAfterWarmUp:
    """A process group whose send raises once the link is up (what gloo does when the peer
    process died: "Connection reset by peer" from inside the call)."""

    def __init__(self, pg):
        self._pg, self.calls = pg, 0

    def send(self, tensors, dst, tag=0):
        self.calls += 1
        if self.calls > 1:  # the first send is the link's warm-up
            raise RuntimeError("gloo/transport/tcp/pair.cc: Read error: Connection reset by peer")
        return self._pg.send(tensors, dst, tag)

    def __getattr__(self, name):
        return getattr(self._pg, name)


@pytest.mark.parametrize("gate", ["0", "1"])
def test_backend_error_while_posting_fails_the_transfer_not_the_caller(monkeypatch, gate):
    """The backend call raising (peer gone) must not raise out of send_pages (it would kill the
    worker's step, as CI saw after a kill -9 of the decode): the transfer ends FAILED, the link
    is torn down with the reason. Gate on: the raise happens on the link thread instead."""
    from glmserve.shared.kvcache import rendezvous

    make = rendezvous._make_group
    monkeypatch.setattr(rendezvous, "_make_group", lambda store, rank, *a: (
        _FailsAfterWarmUp(make(store, rank, *a)) if rank == 0 else make(store, rank, *a)))
    send, recv = _pair(f"fail{gate}", 10.0, monkeypatch, gate)
    src, dst = P.filled_cache(P.GQA, seed=9), PagedKVCache(P.GQA, P.NUM_PAGES)
    recv.recv_pages("f/0", dst, [1])
    send.send_pages("f/0", src, [2])  # must not raise
    assert send.wait("f/0", 10) is XferState.FAILED
    assert send.broken and "backend error: posting send 'f/0'" in send.error and "Connection reset" in send.error
    assert recv.wait("f/0", 15) is XferState.FAILED  # the peer's teardown notice reaches the decode end
    send.close(), recv.close()
