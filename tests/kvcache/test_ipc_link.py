"""The same-host KV link (ipc_link.py) on CPU: the prefill's cache in shared memory, the decode maps it
and copies pages itself. Both ends built by the real rendezvous over a real TCPStore (two threads of
this process here; tests/e2e/test_ipc_fleet.py runs it between real worker processes)."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch

from glmserve.shared.kvcache.cache import KVLayout, PagedKVCache
from glmserve.shared.kvcache.link import LinkMismatch, LinkSignature, XferState
from glmserve.shared.kvcache.rendezvous import accept_link, connect_link, open_store, pick_transport
from glmserve.shared.ports import free_port

pytestmark = pytest.mark.timeout(120)
LAYOUT = KVLayout(num_layers=3, num_parts=2, page_size=4, local_kv_heads=2, entry_dim=8, dtype=torch.float32)


def _pair(transport: str = "ipc", xfer_timeout_s: float = 10.0):
    port = free_port()
    host = open_store("127.0.0.1", port, is_host=True)
    sig = LinkSignature.for_cache("m", LAYOUT, 1)
    src = PagedKVCache(LAYOUT, 16, "cpu", shareable=True)
    dst = PagedKVCache(LAYOUT, 12, "cpu")
    src.buffer.copy_(torch.randn_like(src.buffer))
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fd = ex.submit(accept_link, host, "p0", "d0", 0, sig, "cpu", 10.0, xfer_timeout_s, transport, dst)
        fp = ex.submit(connect_link, open_store("127.0.0.1", port, is_host=False), "p0", "d0", 0, sig, "cpu", 10.0,
                       xfer_timeout_s, transport, src)
        return fp.result(), fd.result(), src, dst, host


def test_pages_and_tensors_arrive_in_order_with_one_copy():
    tx, rx, src, dst, _ = _pair()
    assert type(tx).__name__ == "IPCLink" and type(rx).__name__ == "IPCLink"
    dst.buffer.fill_(-1.0)
    hidden = torch.randn(32)
    out = torch.zeros(32)
    rx.recv_pages("r/0", dst, [5, 6])
    rx.recv_pages("r/1", dst, [7])
    rx.recv_tensor("r/1/h", out)
    tx.send_pages("r/0", src, [3, 9])
    tx.send_pages("r/1", src, [1])
    tx.send_tensor("r/1/h", hidden)
    for x in ("r/0", "r/1", "r/1/h"):
        assert rx.wait(x, 10) is XferState.DONE and tx.wait(x, 10) is XferState.DONE
    assert torch.equal(dst.buffer[:, :, [5, 6, 7]], src.buffer[:, :, [3, 9, 1]])
    assert (dst.buffer[:, :, [0, 1, 2, 3, 4, 8, 9, 10, 11]] == -1).all()  # nothing else written
    assert torch.equal(out, hidden)
    assert rx.stats.bytes_recv == 3 * LAYOUT.page_bytes() + 128 and tx.stats.num_sent == 3
    # a discarded recv (pages no longer ours) keeps the order and writes nothing
    rx.recv_pages("r/2", dst, [0], discard=True)
    tx.send_pages("r/2", src, [2])
    assert rx.wait("r/2", 10) is XferState.ABORTED and tx.wait("r/2", 10) is XferState.DONE
    assert (dst.buffer[:, :, 0] == -1).all()
    tx.close(), rx.close()


def test_a_recv_posted_out_of_order_tears_both_ends_down_before_writing():
    tx, rx, src, dst, _ = _pair()
    dst.buffer.fill_(-1.0)
    rx.recv_pages("a/0", dst, [1])
    tx.send_pages("b/0", src, [2])  # another transfer in that place: header mismatch
    assert rx.wait("a/0", 10) is XferState.FAILED
    assert "different orders or sizes" in rx.error
    assert tx.wait("b/0", 10) is XferState.FAILED and tx.broken and "peer tore the link down" in tx.error
    assert (dst.buffer == -1).all()
    tx.close(), rx.close()


def test_stuck_report_names_what_each_end_waits_for():
    """Long before a deadline the workers log what a slow link waits for (stuck_report)."""
    tx, rx, src, dst, _ = _pair()
    assert rx.stuck_report(0.0) is None and tx.stuck_report(0.0) is None  # nothing unfinished
    rx.recv_pages("r/0", dst, [1])
    rx.recv_pages("r/1", dst, [2])
    time.sleep(0.2)
    note = rx.stuck_report(0.1)
    assert note.startswith("2 unfinished, oldest recv 'r/0' posted")
    posted, published = rx._posted, int(rx.ctrl.head[0])  # the link's warm-up transfer counts too
    assert f"posted {posted}, published {published}, acked {published}, down 0" in note and published == posted - 2
    assert f"link thread: recv 'r/0' (seq {posted - 1}): its descriptor" in note
    assert rx.stuck_report(60.0) is None  # not old enough
    tx.send_pages("r/0", src, [3])
    tx.send_pages("r/1", src, [4])
    assert rx.wait("r/1", 10) is XferState.DONE and tx.wait("r/1", 10) is XferState.DONE
    assert rx.stuck_report(0.0) is None and tx.stuck_report(0.0) is None
    tx.close(), rx.close()


def test_a_send_nobody_receives_fails_at_its_deadline():
    tx, rx, src, dst, _ = _pair(xfer_timeout_s=0.5)
    tx.send_pages("x/0", src, [1])  # published, never acknowledged
    t0 = time.monotonic()
    assert tx.wait("x/0", 10) is XferState.FAILED and "deadline" in tx.error
    assert time.monotonic() - t0 < 5
    assert rx.broken or rx.wait("never", 0.1) is XferState.UNKNOWN
    tx.close(), rx.close()


@pytest.mark.parametrize("p,d,want", [
    (("h", "g1", "auto"), ("h", "g1", "auto"), "ipc"),  # one GPU: NCCL cannot
    (("h", "g1", "auto"), ("h", "g2", "auto"), "pg"),  # two GPUs: NCCL
    (("h", "", "auto"), ("h", "", "auto"), "pg"),  # CPU: gloo
    (("h", "", "ipc"), ("h", "", "auto"), "ipc"),
    (("h", "g1", "ipc"), ("h2", "g1", "ipc"), LinkMismatch),  # ipc needs one host
    (("h", "g1", "ipc"), ("h", "g1", "nccl"), LinkMismatch),  # the two ends disagree
    (("h", "", "gloo"), ("h", "", "gloo"), "pg"),
])
def test_pick_transport(p, d, want):
    ends = [dict(zip(("host", "gpu", "transport"), e)) for e in (p, d)]
    if want is LinkMismatch:
        with pytest.raises(LinkMismatch):
            pick_transport(*ends)
    else:
        assert pick_transport(*ends) == want


def test_scattered_pages_arrive_where_named():
    """Source and destination pages in no order at all (a pool that has turned over)."""
    tx, rx, src, dst, _ = _pair()
    src_ids, dst_ids = [0, 2, 4, 6, 8, 10], [11, 9, 7, 5, 3, 1]
    rx.recv_pages("f/0", dst, dst_ids)
    tx.send_pages("f/0", src, src_ids)
    assert rx.wait("f/0", 10) is XferState.DONE
    assert torch.equal(dst.buffer[:, :, dst_ids], src.buffer[:, :, src_ids])
    tx.close(), rx.close()
