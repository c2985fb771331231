"""Decode side of the two-process KV-link tests: a separate process driven over stdin/stdout.

Run as `python tests/kvcache/kv_peer.py PORT`. It hosts the link TCPStore on PORT, then reads one
scenario name per line from stdin, runs that scenario's decode side and prints one JSON line
{"name", "result"} ("ok" or what went wrong). The prefill sides live in test_link_gloo.py;
both sides share the constants and data helpers below (data comes from seeds, so each side
can compute what the other must hold).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from glmserve.shared.kvcache.cache import KVLayout, PagedKVCache  # noqa: E402
from glmserve.shared.kvcache.link import LinkError, LinkMismatch, LinkSignature, XferState  # noqa: E402
from glmserve.shared.kvcache.rendezvous import accept_link, open_store  # noqa: E402

NUM_PAGES = 12
GQA = KVLayout(num_layers=3, num_parts=2, page_size=4, local_kv_heads=2, entry_dim=8, dtype=torch.float32)
MLA = KVLayout(num_layers=3, num_parts=1, page_size=4, local_kv_heads=1, entry_dim=576, dtype=torch.bfloat16)
HIDDEN = 32
SRC_IDS = [7, 2, 9]  # prefill pages (non-contiguous, unordered)
DST_IDS = [1, 10, 4]  # decode pages they land in
ORDERED = [("o/0", [1]), ("o/1", [2, 3, 4]), ("o/2", [6, 5]), ("o/3", []), ("o/4", [11, 0, 3, 8])]  # (xfer, ids)


DEVICE = "cpu"  # `--device cuda:1` for the NCCL tests


def empty_cache(layout: KVLayout, device: str | None = None) -> PagedKVCache:
    return PagedKVCache(layout, NUM_PAGES, device=device or DEVICE)


def filled_cache(layout: KVLayout, seed: int, device: str | None = None) -> PagedKVCache:
    cache = empty_cache(layout, device)
    g = torch.Generator().manual_seed(seed)
    cache.buffer.copy_(torch.randn(cache.buffer.shape, generator=g).to(layout.dtype))
    return cache


def hidden_of(seed: int) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def signature(layout: KVLayout, **override) -> LinkSignature:
    sig = LinkSignature.for_cache("glm-tiny", layout, tp_size=1)
    return LinkSignature(**{**sig.to_json_dict(), **override})


def accept(store, prefill_id: str, layout: KVLayout, xfer_timeout_s: float = 20.0, **override):
    return accept_link(store, prefill_id, "d0", 0, signature(layout, **override), DEVICE,
                       timeout_s=20.0, xfer_timeout_s=xfer_timeout_s)


def _pages_equal(dst: PagedKVCache, dst_ids, src: PagedKVCache, src_ids) -> bool:
    a, b = dst.buffer[:, :, dst_ids].cpu(), src.buffer[:, :, src_ids].cpu()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _untouched(cache: PagedKVCache, written) -> bool:
    rest = [p for p in range(NUM_PAGES) if p not in written]
    return bool((cache.buffer[:, :, rest] == 0).all())


def _pages(store, name: str, layout: KVLayout, seed: int) -> str:
    link = accept(store, name, layout)
    cache, hidden = empty_cache(layout), torch.empty(HIDDEN, device=DEVICE)
    link.recv_pages(f"{name}/0", cache, DST_IDS)
    link.recv_tensor(f"{name}/0/h", hidden)
    states = [link.wait(f"{name}/0", 20), link.wait(f"{name}/0/h", 20)]
    link.close()
    if states != [XferState.DONE, XferState.DONE]:
        return f"states {states} ({link.error})"
    if not _pages_equal(cache, DST_IDS, filled_cache(layout, seed), SRC_IDS):
        return "page bytes differ"
    if not _untouched(cache, DST_IDS):
        return "a page outside the transfer was written"
    return "ok" if torch.equal(hidden.cpu(), hidden_of(seed)) else "hidden state differs"


def s_gqa(store) -> str:
    return _pages(store, "gqa", GQA, seed=1)


def s_mla(store) -> str:
    return _pages(store, "mla", MLA, seed=2)


def s_ordered(store) -> str:
    """Five transfers of different sizes posted back to back, then the same order on this side."""
    link = accept(store, "ordered", GQA)
    src = filled_cache(GQA, seed=3)
    caches = [empty_cache(GQA) for _ in ORDERED]
    for (xfer, ids), cache in zip(ORDERED, caches):
        link.recv_pages(xfer, cache, ids)
    states = [link.wait(x, 20) for x, _ in ORDERED]
    link.close()
    if any(s is not XferState.DONE for s in states):
        return f"states {states} ({link.error})"
    ok = all(_pages_equal(c, ids, src, ids) for (_, ids), c in zip(ORDERED, caches))
    return "ok" if ok else "page bytes differ"


def s_mismatch(store) -> str:
    try:
        accept(store, "mismatch", GQA, page_size=8)
    except LinkMismatch as e:
        return str(e)
    return "connected despite the mismatch"


def s_order_violation(store) -> str:
    """The prefill sends a then b (same size); this side posts b then a: both must fail."""
    link = accept(store, "order", GQA)
    cache = empty_cache(GQA)
    link.recv_pages("order/b", cache, [3])
    try:
        link.recv_pages("order/a", cache, [4])
    except LinkError:
        pass  # the mismatch on b may already have torn the link down: posting then raises
    state = link.wait("order/b", 20)
    link.close()
    if state is not XferState.FAILED or "different orders" not in link.error:
        return f"state {state}, error {link.error!r}"
    return "ok" if _untouched(cache, []) else "a mis-ordered recv wrote a page"


def s_abort(store) -> str:
    """Abort a posted recv and discard another: both complete, neither writes a page, order kept."""
    link = accept(store, "abort", GQA)
    cache = empty_cache(GQA)
    link.recv_pages("abort/0", cache, [1, 2])
    link.abort("abort/0")
    link.recv_pages("abort/1", cache, [3], discard=True)
    link.recv_pages("abort/2", cache, [5])
    states = [link.wait(x, 20) for x in ("abort/0", "abort/1", "abort/2")]
    link.close()
    if states != [XferState.ABORTED, XferState.DONE, XferState.DONE]:
        return f"states {states} ({link.error})"
    if not _untouched(cache, [5]):
        return "an aborted or discarded recv wrote a page"
    return "ok" if _pages_equal(cache, [5], filled_cache(GQA, seed=4), [6]) else "page bytes differ"


def s_timeout_rebuild(store) -> str:
    """A recv whose send never comes times out and tears the link down; a rebuilt link works."""
    link = accept(store, "timeout", GQA, xfer_timeout_s=1.0)
    cache = empty_cache(GQA)
    link.recv_pages("timeout/0", cache, [1])
    t0 = time.monotonic()
    state = link.wait("timeout/0", 10)
    waited = time.monotonic() - t0
    if state is not XferState.FAILED or not link.broken or "timed out" not in link.error:
        return f"state {state}, broken {link.broken}, error {link.error!r}"
    if waited > 7:  # deadline 1 s + a bounded teardown (group abort <= 5 s)
        return f"the deadline fired late ({waited:.1f} s, abort: {link.abort_error!r})"
    if not _untouched(cache, []):
        return "a timed-out recv wrote a page"
    link = accept(store, "timeout", GQA)  # the prefill tore its end down too and reconnects
    link.recv_pages("timeout/1", cache, [2])
    state = link.wait("timeout/1", 20)
    link.close()
    ok = state is XferState.DONE and _pages_equal(cache, [2], filled_cache(GQA, seed=5), [3])
    return "ok" if ok else f"rebuilt link: {state} ({link.error}; abort: {link.abort_error!r})"


def s_two_links(store) -> str:
    """Two links in this process (two prefill ids); closing one leaves the other working."""
    a, b = accept(store, "two-a", GQA), accept(store, "two-b", GQA)
    cache = empty_cache(GQA)
    a.close()
    b.recv_pages("two-b/0", cache, [8])
    state = b.wait("two-b/0", 20)
    b.close()
    ok = state is XferState.DONE and _pages_equal(cache, [8], filled_cache(GQA, seed=6), [9])
    return "ok" if ok else f"second link: {state} ({b.error})"


SCENARIOS = {f.__name__[2:]: f for f in (s_gqa, s_mla, s_ordered, s_mismatch, s_order_violation,
                                          s_abort, s_timeout_rebuild, s_two_links)}


def prefill_then_die(port: int) -> None:
    """`kv_peer.py PORT --prefill-then-die`: connect as prefill "dying", then SIGKILL itself."""
    from glmserve.shared.kvcache.rendezvous import connect_link

    store = open_store("127.0.0.1", port, is_host=False)
    connect_link(store, "dying", "d0", 0, signature(GQA), "cpu", timeout_s=20.0)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    global DEVICE
    if "--device" in sys.argv:
        DEVICE = sys.argv[sys.argv.index("--device") + 1]
    if "--prefill-then-die" in sys.argv:
        return prefill_then_die(int(sys.argv[1]))
    store = open_store("127.0.0.1", int(sys.argv[1]), is_host=True)
    print(json.dumps({"name": "ready", "result": "ok"}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        try:
            result = SCENARIOS[name](store)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            result = f"error: {type(e).__name__}: {e}"
        print(json.dumps({"name": name, "result": result}), flush=True)


if __name__ == "__main__":
    main()
