"""Two real processes, a real gloo KVLink: this process is the prefill, kv_peer.py the decode.

Each test runs the prefill side of one scenario while the peer runs its decode side (see
kv_peer.py) and reports "ok" or what it found wrong; both sides assert.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.link import LinkMismatch, XferState
from glmserve.shared.kvcache.rendezvous import connect_link, open_store
from glmserve.shared.ports import free_port as _free_port

from . import kv_peer as P

pytestmark = pytest.mark.timeout(120)


class Peer:
    """The decode process; `device` is where its caches live (cpu: gloo, cuda:N: NCCL)."""

    def __init__(self, device: str = "cpu"):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        args = [sys.executable, P.__file__, str(self.port), "--device", device]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self._read()["name"] == "ready"
        self.store = open_store("127.0.0.1", self.port, is_host=False)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"decode peer exited (rc {self.proc.poll()})"
        return json.loads(line)

    def start(self, name: str) -> None:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def result(self, name: str) -> str:
        msg = self._read()
        assert msg["name"] == name
        return msg["result"]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module", params=["0", "1"], ids=["ungated", "gated"])
def peer(request):
    """Every scenario twice: as gloo runs by default, and with the send gate on at both ends (the
    CUDA default: sends wait for the peer's matching recv, recvs are counted before posting)."""
    old = os.environ.get("KVLINK_SEND_GATE")
    os.environ["KVLINK_SEND_GATE"] = request.param  # read by this process's links and the peer's
    p = Peer()
    yield p
    p.stop()
    if old is None:
        os.environ.pop("KVLINK_SEND_GATE", None)
    else:
        os.environ["KVLINK_SEND_GATE"] = old


def connect(peer: Peer, name: str, layout, xfer_timeout_s: float = 20.0, dev: str = "cpu", **override):
    return connect_link(peer.store, name, "d0", 0, P.signature(layout, **override), dev,
                        timeout_s=20.0, xfer_timeout_s=xfer_timeout_s)


def run_pages(peer: Peer, name: str, layout, seed: int, dev: str = "cpu") -> None:
    peer.start(name)
    link = connect(peer, name, layout, dev=dev)
    cache = P.filled_cache(layout, seed, dev)
    link.send_pages(f"{name}/0", cache, P.SRC_IDS)
    link.send_tensor(f"{name}/0/h", P.hidden_of(seed).to(dev))
    assert link.wait(f"{name}/0", 20) is XferState.DONE
    assert link.wait(f"{name}/0/h", 20) is XferState.DONE
    assert link.stats.bytes_sent == layout.page_bytes() * len(P.SRC_IDS) + P.HIDDEN * 4
    assert peer.result(name) == "ok"
    link.close()


def test_gqa_pages_and_hidden_arrive_bytes_equal(peer):
    run_pages(peer, "gqa", P.GQA, seed=1)


def test_mla_bf16_pages_and_hidden_arrive_bytes_equal(peer):
    run_pages(peer, "mla", P.MLA, seed=2)


def test_several_transfers_in_order(peer):
    run_ordered(peer)


def run_ordered(peer: Peer, dev: str = "cpu") -> None:
    peer.start("ordered")
    link = connect(peer, "ordered", P.GQA, dev=dev)
    cache = P.filled_cache(P.GQA, seed=3, device=dev)
    for xfer, ids in P.ORDERED:
        link.send_pages(xfer, cache, ids)
    assert [link.wait(x, 20) for x, _ in P.ORDERED] == [XferState.DONE] * len(P.ORDERED)
    assert peer.result("ordered") == "ok"
    link.close()


def test_signature_mismatch_refused_on_both_ends_naming_the_field(peer):
    peer.start("mismatch")
    with pytest.raises(LinkMismatch) as err:
        connect(peer, "mismatch", P.GQA)
    mine = str(err.value)
    assert "page_size differs (prefill 4, decode 8)" in mine and "dtype" not in mine
    theirs = peer.result("mismatch")
    assert "page_size differs (prefill 4, decode 8)" in theirs, theirs


def test_posting_in_different_orders_fails_instead_of_writing_wrong_pages(peer):
    peer.start("order_violation")
    link = connect(peer, "order", P.GQA)
    cache = P.filled_cache(P.GQA, seed=7)
    link.send_pages("order/a", cache, [1])
    link.send_pages("order/b", cache, [2])
    assert peer.result("order_violation") == "ok"
    link.close()


def test_abort_and_discard_let_transfers_finish_without_writing(peer):
    run_abort(peer)


def run_abort(peer: Peer, dev: str = "cpu") -> None:
    peer.start("abort")
    link = connect(peer, "abort", P.GQA, dev=dev)
    cache = P.filled_cache(P.GQA, seed=4, device=dev)
    link.send_pages("abort/0", cache, [1, 2])
    link.send_pages("abort/1", cache, [3])
    link.send_pages("abort/2", cache, [6])
    assert [link.wait(x, 20) for x in ("abort/0", "abort/1", "abort/2")] == [XferState.DONE] * 3
    assert peer.result("abort") == "ok"
    link.close()


def test_timeout_tears_down_then_link_is_rebuilt(peer):
    run_timeout_rebuild(peer)


def run_timeout_rebuild(peer: Peer, dev: str = "cpu") -> None:
    peer.start("timeout_rebuild")
    link = connect(peer, "timeout", P.GQA, dev=dev)
    # the decode's recv times out (nothing is sent); the control plane tells this side, which
    # tears its end down too before it reuses any page, then both build a new link
    time.sleep(1.5)
    t0 = time.monotonic()
    link.teardown("peer reported a timeout")
    assert link.broken and link.abort_error == "", link.abort_error  # the group abort returned
    assert time.monotonic() - t0 < 6  # teardown is bounded (it never waits on the peer for long)
    with pytest.raises(Exception, match="broken"):
        link.send_pages("timeout/x", P.filled_cache(P.GQA, seed=5, device=dev), [1])
    link = connect(peer, "timeout", P.GQA, dev=dev)
    link.send_pages("timeout/1", P.filled_cache(P.GQA, seed=5, device=dev), [3])
    assert link.wait("timeout/1", 20) is XferState.DONE
    assert peer.result("timeout_rebuild") == "ok"
    link.close()


def test_two_links_in_one_process_shut_down_one_at_a_time(peer):
    run_two_links(peer)


def run_two_links(peer: Peer, dev: str = "cpu") -> None:
    peer.start("two_links")
    a, b = connect(peer, "two-a", P.GQA, dev=dev), connect(peer, "two-b", P.GQA, dev=dev)
    a.close()
    b.send_pages("two-b/0", P.filled_cache(P.GQA, seed=6, device=dev), [9])
    assert b.wait("two-b/0", 20) is XferState.DONE
    assert peer.result("two_links") == "ok"
    b.close()


def test_send_past_deadline_fails_and_breaks_link():
    """In-process pair (two threads): a recv that never gets its send fails at its deadline."""
    port = _free_port()
    host = open_store("127.0.0.1", port, is_host=True)
    from glmserve.shared.kvcache.rendezvous import accept_link, in_background

    fut = in_background(accept_link, host, "solo", "d0", 0, P.signature(P.GQA), "cpu", 20.0, 1.0)
    send = connect_link(open_store("127.0.0.1", port, False), "solo", "d0", 0, P.signature(P.GQA), "cpu", 20.0, 1.0)
    recv = fut.result(20)
    cache = PagedKVCache(P.GQA, P.NUM_PAGES)
    recv.recv_pages("solo/0", cache, [1, 2])
    assert recv.poll("solo/0") is XferState.PENDING
    assert recv.wait("solo/0", 5) is XferState.FAILED
    assert recv.broken and "timed out after 1 s" in recv.error
    assert recv.poll("never-posted") is XferState.UNKNOWN
    assert bool((cache.buffer == 0).all())
    send.close()


def test_peer_killed_mid_transfer_fails_the_link_fast():
    """kill -9 of the prefill while the decode waits for a push: FAILED in seconds, not at the deadline."""
    port = _free_port()
    host = open_store("127.0.0.1", port, is_host=True)
    from glmserve.shared.kvcache.rendezvous import accept_link, in_background

    fut = in_background(accept_link, host, "dying", "d0", 0, P.signature(P.GQA), "cpu", 30.0, 60.0)
    proc = subprocess.Popen([sys.executable, P.__file__, str(port), "--prefill-then-die"])
    recv = fut.result(30)
    cache = PagedKVCache(P.GQA, P.NUM_PAGES)
    recv.recv_pages("dying/0", cache, [1, 2])
    t0 = time.monotonic()
    assert recv.wait("dying/0", 30) is XferState.FAILED
    assert time.monotonic() - t0 < 10 and recv.broken and "closed" in recv.error.lower()
    assert bool((cache.buffer == 0).all())
    assert proc.wait(10) == -9


def test_size_disagreement_fails_without_writing():
    """The decode expects 2 pages, the prefill sends 1: the header check fails the recv."""
    port = _free_port()
    host = open_store("127.0.0.1", port, is_host=True)
    from glmserve.shared.kvcache.rendezvous import accept_link, in_background

    fut = in_background(accept_link, host, "size", "d0", 0, P.signature(P.GQA), "cpu", 20.0, 10.0)
    send = connect_link(open_store("127.0.0.1", port, False), "size", "d0", 0, P.signature(P.GQA), "cpu", 20.0, 10.0)
    recv = fut.result(20)
    cache = PagedKVCache(P.GQA, P.NUM_PAGES)
    recv.recv_pages("size/0", cache, [1, 2])
    send.send_pages("size/0", P.filled_cache(P.GQA, seed=8), [3])
    assert recv.wait("size/0", 10) is XferState.FAILED
    assert "(3072 bytes) got another transfer (1536 bytes)" in recv.error and recv.broken
    assert bool((cache.buffer == 0).all())
    send.close()
