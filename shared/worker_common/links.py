"""This rank's KV links, one per peer worker (every rank of prefill and decode workers).

Applies the LinkOps of a step plan on top of shared.kvcache's KVLink (gloo on CPU, NCCL on
GPU; the KV-link part owns it): rank i of a prefill worker talks to rank i of a decode worker.
Transfer ids are f"{rid}/{chunk_index}"; a last push also moves the prompt's final hidden
state as f"{rid}/{chunk_index}/h" (shape [hidden], the MTP seed). `poll` answers "pending",
"done" or a failure reason; "wait" blocks this rank until its own transfers of a rid (or one
xfer) completed, so followers never reuse a page their link still reads or writes.
"""

from __future__ import annotations

import collections
import logging
import time

import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.link import LinkError
from glmserve.shared.protocol import unpack_ids
from glmserve.shared.worker_common.plan import LinkOp

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = {"cpu": 10.0, "cuda": 90.0}  # rendezvous: the peer must join within this (NCCL init is slow)
XFER_TIMEOUT_S = 30.0  # a posted transfer must complete within this, else the link is torn down
MAX_HIDDENS = 4096  # received MTP seed states kept until taken (oldest dropped first)


class LinkSet:
    def __init__(self, role: str, worker_id: str, tp_rank: int, tp_size: int, cache: PagedKVCache,
                 signature, hidden_size: int = 0, hidden_dtype: torch.dtype = torch.float32,
                 transport: str = "auto"):
        self.role, self.worker_id, self.tp_rank, self.tp_size = role, worker_id, tp_rank, tp_size
        self.cache = cache
        self.transport = transport  # --kv_transport
        self.device = cache.buffer.device
        self.signature = signature  # shared.kvcache.link.LinkSignature of this rank's cache
        self.stores: dict[tuple[str, int], object] = {}  # (host, port) -> TCPStore client/host
        self._retired = (0, 0.0)  # (bytes, seconds) of links closed or replaced
        self._last_stuck_check = 0.0
        self.hidden_size, self.hidden_dtype = hidden_size, hidden_dtype
        self.links: dict[str, object] = {}  # peer id -> KVLink
        self.xfers: dict[str, set[str]] = {}  # peer id -> xfer ids posted and not yet waited
        self.posted: dict[str, object] = {}  # xfer id -> the link it was posted on (until waited)
        # xfer id -> received hidden [hidden]; bounded: followers and aborted requests never take theirs
        self.hiddens: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._warned: set[str] = set()  # xfer ids whose failure was logged (poll is called often)
        self.failed: dict[str, str] = {}  # xfer id -> reason, for ops that could not be posted (bounded)

    def apply(self, op: LinkOp, hidden: torch.Tensor | None) -> None:
        getattr(self, "_" + op.kind)(op, hidden)

    def _connect(self, op: LinkOp, _) -> None:
        """Build (or rebuild) the link to op.peer; blocks until the peer's rank joins (30 s max).

        Prefill ranks call connect_link (a new attempt), decode ranks accept_link (the newest
        attempt). The decode leader's TCPStore at op.host:op.port is the rendezvous."""
        from glmserve.shared.kvcache import rendezvous as rv

        self._retire(self.links.pop(op.peer, None))
        try:
            store = self._store(op.host, op.port)
            if self.role == "prefill":
                link = rv.connect_link(store, self.worker_id, op.peer, self.tp_rank, self.signature, self.device,
                                       timeout_s=CONNECT_TIMEOUT_S[self.device.type], xfer_timeout_s=XFER_TIMEOUT_S,
                                       transport=self.transport, cache=self.cache)
            else:
                link = rv.accept_link(store, op.peer, self.worker_id, self.tp_rank, self.signature, self.device,
                                      timeout_s=CONNECT_TIMEOUT_S[self.device.type], xfer_timeout_s=XFER_TIMEOUT_S,
                                      transport=self.transport, cache=self.cache)
        except Exception as e:  # noqa: BLE001 - LinkError, LinkMismatch, store errors: no link, retry later
            log.error("%s rank %d: KV link to %s failed: %s", self.worker_id, self.tp_rank, op.peer, e)
            return
        self.links[op.peer] = link
        self.xfers[op.peer] = set()
        log.info("%s rank %d: KV link to %s over %s", self.worker_id, self.tp_rank, op.peer, type(link).__name__)

    def has(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and not link.broken

    def host_store(self, host: str, port: int) -> None:
        """Decode leader: host the KV-link TCPStore on --link_port (before announcing it)."""
        from glmserve.shared.kvcache.rendezvous import open_store

        self.stores[(host, port)] = open_store(host, port, is_host=True)

    def _store(self, host: str, port: int):
        """A client of the decode's TCPStore; prefills reconnect on every link build (the decode
        may have restarted with a new store on the same port)."""
        from glmserve.shared.kvcache.rendezvous import open_store

        if (host, port) not in self.stores or self.role == "prefill":
            self.stores[(host, port)] = open_store(host, port, is_host=False)
        return self.stores[(host, port)]

    def _send(self, op: LinkOp, hidden: torch.Tensor | None) -> None:
        link = self._link_for_post(op)
        if link is None:
            return
        self.posted[op.xfer_id] = link
        if not self._posts(op, lambda: link.send_pages(op.xfer_id, self.cache, unpack_ids(op.page_ids))):
            return
        self.xfers[op.peer].add(op.xfer_id)
        if op.hidden_row >= 0:
            assert hidden is not None, "a last push needs the step's hidden states"
            if self._posts(op, lambda: link.send_tensor(op.xfer_id + "/h", hidden[op.hidden_row].contiguous())):
                self.xfers[op.peer].add(op.xfer_id + "/h")

    def _posts(self, op: LinkOp, post) -> bool:
        """Run one post; a link that broke meanwhile (LinkError) fails the transfer instead of the step."""
        try:
            post()
            return True
        except LinkError as e:
            self._fail(op, f"not posted: {e}")
            return False

    def _recv(self, op: LinkOp, _) -> None:
        self._post_recv(op, discard=False)

    def _drain(self, op: LinkOp, _) -> None:
        """Receive a push meant for pages no longer held here and drop it (keeps the link's order;
        a discarding recv never writes a cache page)."""
        self._post_recv(op, discard=True)

    def _post_recv(self, op: LinkOp, discard: bool) -> None:
        link = self._link_for_post(op)
        if link is None:
            return
        self.posted[op.xfer_id] = link
        if op.page_ids:
            if not self._posts(op, lambda: link.recv_pages(op.xfer_id, self.cache, unpack_ids(op.page_ids),
                                                           discard=discard)):
                return
            self.xfers[op.peer].add(op.xfer_id)
        if op.hidden_row > 0:  # recv ops use hidden_row as a flag: 1 = a hidden state follows
            buf = torch.empty(self.hidden_size, dtype=self.hidden_dtype, device=self.cache.buffer.device)
            keep = not discard and self.tp_rank == 0  # only the leader seeds MTP (followers get it broadcast)
            if not self._posts(op, lambda: link.recv_tensor(op.xfer_id + "/h", buf, discard=not keep)):
                return
            if keep:
                self.hiddens[op.xfer_id] = buf
                while len(self.hiddens) > MAX_HIDDENS:
                    self.hiddens.popitem(last=False)
            self.xfers[op.peer].add(op.xfer_id + "/h")

    def _link_for_post(self, op: LinkOp):
        """The live link to op.peer, or None when it is gone or broken: then the transfer is
        recorded as failed ("link_down" from poll) instead of raising out of the step."""
        link = self.links.get(op.peer)
        if link is not None and not link.broken:
            return link
        self._fail(op, f"not posted: the link is {'broken' if link is not None else 'gone'}")
        return None

    def _fail(self, op: LinkOp, why: str) -> None:
        """op's transfer is over: poll says "link_down" (bounded memory), one WARNING."""
        self.failed[op.xfer_id] = "link_down"
        while len(self.failed) > MAX_HIDDENS:
            del self.failed[next(iter(self.failed))]
        log.warning("%s rank %d: KV %s %s with %s %s", self.worker_id, self.tp_rank, op.kind, op.xfer_id, op.peer, why)

    def _wait(self, op: LinkOp, _) -> None:
        for x in _under(op.xfer_id, self.failed):
            del self.failed[x]
        for x in _under(op.xfer_id, self.posted):
            del self.posted[x]
        link = self.links.get(op.peer)
        if link is None:
            return
        mine = _under(op.xfer_id, self.xfers.get(op.peer, ()))
        deadline = time.monotonic() + 120.0
        for x in mine:
            while link.poll(x).value == "pending":
                if time.monotonic() > deadline:
                    log.warning("%s rank %d: transfer %s never completed (120 s); link error %r",
                                self.worker_id, self.tp_rank, x, link.error)
                    raise TimeoutError(f"{self.worker_id} rank {self.tp_rank}: transfer {x} never completed")
                time.sleep(0.0005)
            self.xfers[op.peer].discard(x)
            link.forget(x)

    def wait_posted(self, timeout_s: float) -> None:
        """Block until every transfer posted on this rank's links is no longer pending (the
        leader's stand-in for a device-wide sync, GLM_PREFILL_SYNC_SENDS); TimeoutError after
        timeout_s names the stuck transfers."""
        end = time.monotonic() + timeout_s
        for peer, link in self.links.items():
            for x in list(self.xfers.get(peer, ())):
                while link.poll(x).value == "pending":
                    if time.monotonic() > end:
                        raise TimeoutError(f"{self.worker_id}: transfer {x} to {peer} still pending after "
                                           f"{timeout_s:g} s (its recv was never posted)")
                    time.sleep(0.001)

    def _close(self, op: LinkOp, _) -> None:
        self._retire(self.links.pop(op.peer, None))

    def _retire(self, link) -> None:
        if link is None:
            return
        b, secs = self._retired
        self._retired = (b + link.stats.bytes_sent + link.stats.bytes_recv, secs + link.stats.seconds)
        link.close()

    def report_stuck(self, older_than_s: float = 5.0, every_s: float = 5.0) -> None:
        """WARNING per link whose oldest unfinished transfer is older than older_than_s (at most
        every every_s): what each end waits for, long before the transfer deadline fails it."""
        now = time.monotonic()
        if now - self._last_stuck_check < every_s:
            return
        self._last_stuck_check = now
        for peer, link in list(self.links.items()):
            note = link.stuck_report(older_than_s)
            if note is not None:
                log.warning("%s rank %d: KV link with %s slow: %s", self.worker_id, self.tp_rank, peer, note)

    def totals(self) -> tuple[int, float]:
        """(bytes, seconds) moved by every link of this rank so far, sends and recvs; seconds sum
        each transfer's post -> completion time (so bytes/seconds is a per-transfer rate)."""
        b, secs = self._retired
        for link in self.links.values():
            b += link.stats.bytes_sent + link.stats.bytes_recv
            secs += link.stats.seconds
        return b, secs

    def poll(self, peer: str, xfer_id: str) -> str:
        """"pending" | "done" | a failure reason, for a transfer and its hidden part together.

        A transfer not posted yet (its op rides in the next plan) is "pending"; one posted on a
        link that has since been replaced or closed is "link_down"."""
        if xfer_id in self.failed:
            return self.failed[xfer_id]
        link = self.links.get(peer)
        posted_on = self.posted.get(xfer_id)
        if posted_on is None:
            return "pending" if link is not None else "link_down"
        if link is None or posted_on is not link:
            return "link_down"
        states = [link.poll(x).value for x in (xfer_id, xfer_id + "/h") if x in self.xfers.get(peer, ())]
        for s in states:
            if s not in ("pending", "done", "aborted"):
                self._warn_failed(peer, xfer_id, s, link)
                return s
        return "pending" if "pending" in states else "done"

    def _warn_failed(self, peer: str, xfer_id: str, state: str, link) -> None:
        """One WARNING per failed transfer: which, on which link, and the link's reason."""
        if xfer_id in self._warned:
            return
        if len(self._warned) > MAX_HIDDENS:
            self._warned.clear()
        self._warned.add(xfer_id)
        log.warning("%s rank %d: KV transfer %s with %s %s: %s", self.worker_id, self.tp_rank, xfer_id, peer,
                    state, getattr(link, "error", "") or "no reason recorded")

    def take_hidden(self, peer: str, xfer_id: str) -> torch.Tensor | None:
        return self.hiddens.pop(xfer_id, None)

    def close_all(self) -> None:
        for peer in list(self.links):
            self._retire(self.links.pop(peer))


def _under(key: str, xfer_ids) -> list[str]:
    """The transfer ids of `key` (a rid or one transfer id): itself and those below it ("rid/0", "rid/0/h")."""
    return [x for x in xfer_ids if x == key or x.startswith(key + "/")]
