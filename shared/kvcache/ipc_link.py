"""IPCLink: the KVLink between a prefill rank and a decode rank on the same host (one GPU or two).

Runs inside both worker ranks of a pair, built by `shared.kvcache.rendezvous` when the transport
is "ipc" (`--kv_transport cuda_ipc`, or `auto` when both ends sit on the same GPU, where NCCL
refuses two ranks). The contract is `shared.kvcache.link`'s; what differs is how bytes move:

- At connect the prefill exports its KV cache buffer (ipc_map: a CUDA IPC handle, or a named
  shared-memory segment on CPU) and creates a control block (shared memory, below); the decode
  maps both. No process group, no staging buffer.
- A send publishes a descriptor (transfer-id hash, byte count, the prefill's page ids) in the
  control block once the prefill's forward has written those pages (CUDA: an event recorded at
  post time, polled by the link thread). It is DONE when the decode acknowledged it: the decode
  has finished reading the pages, so they may be reused.
- A recv waits for the descriptor of the same sequence number (both ends post in the same order),
  checks hash and size (a mismatch tears the link down before any page is written), then copies
  the prefill's pages straight into its own (kernels/kv_pages.copy_between: ONE device copy per
  push, at 0.9 of the GPU's copy bandwidth from 4k tokens) on its side stream after its compute stream's event,
  waits for that copy, and acknowledges. A discarded or aborted recv copies nothing.
- send_tensor / recv_tensor (the MTP seed, a few KB) carry their bytes in the descriptor.

Control block (int64 words): [0] sends published, [1] recvs acknowledged, [2] torn down (either
end), then SLOTS descriptors of SLOT_BYTES: [seq, kind, hash, nbytes, count] + payload (page ids as
int32, or tensor bytes). Both counters only grow; slot seq % SLOTS is reused once acknowledged.
Each end's link thread is the only writer of its counter. Teardown sets word 2: the peer's thread
sees it within one poll and tears down too; every unfinished transfer is FAILED, no page written.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
import numpy as np
import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.cuda_wait import wait_event
from glmserve.shared.kvcache.ipc_map import attach_segment, create_segment
from glmserve.shared.kvcache.link import KVLink, LinkError, LinkStats, TransferTable, XferState
from glmserve.shared.kvcache.xfer_buffer import as_page_ids, xfer_hash

log = logging.getLogger("glmserve.shared.kvcache.link")
SLOTS = 32
SLOT_BYTES = 256 * 1024  # header (40 B) + up to ~65k page ids or ~256 KB of tensor bytes
HEAD_WORDS = 8  # [published, acked, down, ...reserved]
_SLOT_HEAD = 5  # seq, kind, hash, nbytes, count
PAGES, TENSOR = 0, 1
SPIN_S = 2e-4  # link-thread polls yield without sleeping this long, then back off


def control_bytes() -> int:
    return HEAD_WORDS * 8 + SLOTS * SLOT_BYTES


class ControlBlock:
    """The shared control memory of one link (created by the prefill, attached by the decode)."""

    def __init__(self, name: str | None = None):
        self.seg = create_segment(control_bytes()) if name is None else attach_segment(name)
        self.owner = name is None
        self.head = np.ndarray((HEAD_WORDS,), dtype=np.int64, buffer=self.seg.buf)
        if self.owner:
            self.head[:] = 0

    @property
    def name(self) -> str:
        return self.seg.name

    def slot(self, seq: int) -> memoryview:
        off = HEAD_WORDS * 8 + (seq % SLOTS) * SLOT_BYTES
        return self.seg.buf[off:off + SLOT_BYTES]

    def close(self) -> None:
        self.head = None  # drop the numpy view before the segment closes
        try:
            self.seg.close()
            if self.owner:
                self.seg.unlink()
        except (BufferError, FileNotFoundError):
            pass


@dataclass
class _Xfer:
    xfer_id: str
    kind: str  # "send" | "recv"
    seq: int  # 1-based, per direction, in post order
    nbytes: int
    posted: float
    deadline: float
    what: int = PAGES
    ids: torch.Tensor | None = None  # send: source page ids (host int32); recv: destination ids (device)
    data: bytes = b""  # send_tensor: the bytes
    out: torch.Tensor | None = None  # recv_tensor: filled when done
    cache: PagedKVCache | None = None
    ready: torch.cuda.Event | None = None  # send: pages written; recv: old readers of the pages done
    discard: bool = False
    aborted: bool = False
    state: XferState = XferState.PENDING
    marks: dict[str, float] | None = None  # CLOCK_MONOTONIC of each stage (bench/kv_ipc.py prints them)


class IPCLink(TransferTable, KVLink):
    DEADLINE_SLACK_S = 1.0  # the link thread fires deadlines itself; poll() only catches a stuck thread

    def __init__(self, rank: int, name: str, device: torch.device | str, timeout_s: float, ctrl: ControlBlock,
                 peer_cache: torch.Tensor | None = None):
        """rank 0 = prefill (sender), 1 = decode (receiver, with the prefill's cache mapped as peer_cache)."""
        self.rank, self.name, self.device = rank, name, torch.device(device)
        self.timeout_s = timeout_s
        self.broken, self.error = False, ""
        self.stats = LinkStats()
        self.ctrl = ctrl
        self.peer_cache = peer_cache
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._xfers: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()
        self._pending: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()
        self._queue: queue.Queue[_Xfer | None] = queue.Queue()
        self._posted = 0
        self._stage = "idle"  # what the link thread waits for now (stuck_report)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staging: torch.Tensor | None = None  # pinned source page ids of the copy in flight
        self.last_marks: dict[str, float] = {}  # stage times of the last finished transfer
        self._thread = threading.Thread(target=self._run, name=f"kvlink-ipc {name}", daemon=True)
        self._thread.start()

    # ---- posting (caller thread) ----------------------------------------------------
    def _compute_event(self) -> torch.cuda.Event | None:
        if self._stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def send_pages(self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor) -> None:
        ids = torch.as_tensor(page_ids, dtype=torch.int32).cpu()
        if 4 * ids.numel() > SLOT_BYTES - 8 * _SLOT_HEAD:
            raise LinkError(f"{xfer_id}: {ids.numel()} pages exceed one IPC descriptor")
        self._post(_Xfer(xfer_id, "send", 0, cache.layout.page_bytes() * ids.numel(), 0, 0, PAGES, ids=ids,
                         ready=self._compute_event()))

    def recv_pages(self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor,
                   discard: bool = False) -> None:
        ids = as_page_ids(page_ids, cache.buffer.device)
        self._post(_Xfer(xfer_id, "recv", 0, cache.layout.page_bytes() * ids.numel(), 0, 0, PAGES, ids=ids,
                         cache=cache, ready=self._compute_event(), discard=discard))

    def send_tensor(self, xfer_id: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()  # a few KB; syncs
        if len(data) > SLOT_BYTES - 8 * _SLOT_HEAD:
            raise LinkError(f"{xfer_id}: tensor of {len(data)} B exceeds one IPC descriptor")
        self._post(_Xfer(xfer_id, "send", 0, len(data), 0, 0, TENSOR, data=data))

    def recv_tensor(self, xfer_id: str, out: torch.Tensor, discard: bool = False) -> None:
        self._post(_Xfer(xfer_id, "recv", 0, out.numel() * out.element_size(), 0, 0, TENSOR, out=out,
                         discard=discard))

    def _post(self, x: _Xfer) -> None:
        with self._lock:
            if self.broken:
                raise LinkError(f"KV link {self.name} is broken: {self.error}")
            if x.xfer_id in self._xfers:
                raise LinkError(f"transfer {x.xfer_id!r} posted twice on {self.name}")
            self._posted += 1
            x.seq, x.posted = self._posted, time.monotonic()
            x.deadline = x.posted + self.timeout_s
            self._xfers[x.xfer_id] = self._pending[x.xfer_id] = x
            self._prune_locked()
        self._queue.put(x)

    def _state_note(self) -> str:
        try:
            head = self.ctrl.head
            counters = f"published {int(head[0])}, acked {int(head[1])}, down {int(head[2])}"
        except (TypeError, ValueError):  # control block closed
            counters = "control block closed"
        return f"; posted {self._posted}, {counters}; link thread: {self._stage}"

    # ---- the link thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                x = self._queue.get()
                if x is None or self.broken:
                    return
                ok = self._send(x) if x.kind == "send" else self._recv(x)
                if not ok:
                    return
        except Exception as e:  # noqa: BLE001 - the link breaks, the worker does not
            self.teardown(f"link thread failed: {type(e).__name__}: {e}")

    def _until(self, x: _Xfer, cond) -> bool:
        """Poll cond() until true; False once the link broke, the peer tore down or x's deadline passed.
        The first SPIN_S only yield the GIL between checks (a push is usually seen within microseconds);
        then sleeps of 5 % of the time waited, between 20 us and 0.5 ms (as cuda_wait)."""
        t0 = time.monotonic()
        while not cond():
            if self.broken:
                return False
            if self.ctrl.head[2]:
                self.teardown("the peer tore the link down")
                return False
            if time.monotonic() > x.deadline:
                self.teardown(f"{x.kind} {x.xfer_id!r} timed out after {self.timeout_s:g} s (deadline; {x.nbytes} B)")
                return False
            waited = time.monotonic() - t0
            time.sleep(0 if waited < SPIN_S else min(5e-4, max(2e-5, 0.05 * waited)))
        return True

    def _wait_cuda(self, x: _Xfer, ev: torch.cuda.Event | None) -> bool:
        if ev is None:
            return True
        ok = wait_event(ev, lambda: self.broken or bool(self.ctrl.head[2]) or time.monotonic() > x.deadline)
        if not ok and not self.broken:
            self.teardown("the peer tore the link down" if self.ctrl.head[2] else
                          f"{x.kind} {x.xfer_id!r} timed out after {self.timeout_s:g} s (deadline; {x.nbytes} B)")
        return ok and not self.broken

    def _send(self, x: _Xfer) -> bool:
        head = self.ctrl.head
        self._stage = f"send {x.xfer_id!r} (seq {x.seq}): its pages' forward"
        if not self._wait_cuda(x, x.ready):  # the forward wrote the pages
            return False
        self._stage = f"send {x.xfer_id!r} (seq {x.seq}): a free descriptor"
        if not self._until(x, lambda: head[0] - head[1] < SLOTS):  # a free descriptor
            return False
        slot = self.ctrl.slot(x.seq)
        payload = x.ids.numpy().tobytes() if x.what == PAGES else x.data
        count = x.ids.numel() if x.what == PAGES else len(x.data)
        slot[8 * _SLOT_HEAD:8 * _SLOT_HEAD + len(payload)] = payload
        np.ndarray((_SLOT_HEAD,), np.int64, slot)[:] = (x.seq, x.what, xfer_hash(x.xfer_id), x.nbytes, count)
        head[0] = x.seq  # publish (x86-64 and aarch64 Linux: the slot's stores are visible first)
        x.marks = {"posted": x.posted, "published": time.monotonic()}
        self._stage = f"send {x.xfer_id!r} (seq {x.seq}): the decode's acknowledgement"
        if not self._until(x, lambda: head[1] >= x.seq):  # the decode read the pages
            return False
        self._stage = "idle"
        self._finish(x, XferState.ABORTED if x.aborted else XferState.DONE)
        return True

    def _recv(self, x: _Xfer) -> bool:
        head = self.ctrl.head
        self._stage = f"recv {x.xfer_id!r} (seq {x.seq}): its descriptor"
        if not self._until(x, lambda: head[0] >= x.seq):
            return False
        self._stage = f"recv {x.xfer_id!r} (seq {x.seq}): the copy"
        x.marks = {"posted": x.posted, "seen": time.monotonic()}
        slot = self.ctrl.slot(x.seq)
        seq, what, h, nbytes, count = (int(v) for v in np.ndarray((_SLOT_HEAD,), np.int64, slot))
        if seq != x.seq or what != x.what or h != xfer_hash(x.xfer_id) or nbytes != x.nbytes:
            self.teardown(f"recv {x.xfer_id!r} ({x.nbytes} B) got another transfer ({nbytes} B, seq {seq} "
                          f"for {x.seq}): the two ends posted different orders or sizes")
            return False
        keep = not (x.discard or x.aborted)
        if keep and what == PAGES:
            src = torch.frombuffer(bytearray(slot[8 * _SLOT_HEAD:8 * _SLOT_HEAD + 4 * count]), dtype=torch.int32)
            if not self._copy_pages(x, src):
                return False
        elif keep:
            data = torch.frombuffer(bytearray(slot[8 * _SLOT_HEAD:8 * _SLOT_HEAD + count]), dtype=torch.uint8)
            x.out.view(-1).view(torch.uint8).copy_(data.to(x.out.device))  # a few KB
        head[1] = x.seq  # acknowledge: the prefill may reuse the pages
        self._stage = "idle"
        x.marks["acked"] = time.monotonic()
        self._finish(x, XferState.DONE if keep else XferState.ABORTED)
        return True

    def _copy_pages(self, x: _Xfer, src_ids: torch.Tensor) -> bool:
        """The push's one copy: peer pages src_ids -> our pages x.ids (CUDA: on the side stream, waited).
        Always the page-indexed copy: strided copy_ per contiguous run was measured 2x slower on the
        device at 16k tokens and saved no host time (h200_run5_kvipc)."""
        dst, peer = x.cache.buffer, self.peer_cache
        if self._stream is None:
            from glmserve.kernels.kv_pages import copy_between_ref

            copy_between_ref(peer, src_ids.long(), dst, x.ids.long())
            return True
        from glmserve.kernels.kv_pages import copy_between

        if self._staging is None:  # pinned once: one transfer is copied at a time (waited below)
            self._staging = torch.empty(SLOT_BYTES // 4, dtype=torch.int32).pin_memory()
        staged = self._staging[:src_ids.numel()]
        staged.copy_(src_ids)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(x.ready)  # kernels still reading the pages' previous owner
            copy_between(peer, staged.to(self.device, non_blocking=True), dst, x.ids)
            done = torch.cuda.Event()
            done.record(self._stream)
        x.marks["launched"] = time.monotonic()
        ok = self._wait_cuda(x, done)
        x.marks["copied"] = time.monotonic()
        return ok

    def _finish(self, x: _Xfer, state: XferState) -> None:
        with self._lock:
            if x.state is XferState.PENDING:  # else a teardown failed it meanwhile
                self._mark_locked(x, state)

    def _mark_locked(self, x: _Xfer, state: XferState) -> None:
        if x.marks is not None and state is not XferState.FAILED:
            x.marks["finished"] = time.monotonic()
            self.last_marks = x.marks
        self._ended_locked(x, state)
        if state is not XferState.FAILED:  # a failed one's copy may still be queued: keep its tensors
            x.ids = x.out = x.cache = x.ready = None

    def close(self) -> None:
        self.teardown("closed")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self.ctrl.close()

    def teardown(self, reason: str) -> None:
        stuck = self._fail_all(reason)
        if stuck is None:
            return
        try:
            self.ctrl.head[2] = 1  # the peer's thread sees it within one poll
        except TypeError:  # control block already closed
            pass
        self._queue.put(None)
        log.log(logging.INFO if reason == "closed" and not stuck else logging.WARNING,
                "KV link %s torn down: %s (%d unfinished: %s)", self.name, reason, len(stuck),
                ", ".join(f"{x.kind} {x.xfer_id!r}" for x in stuck[:8]))
        if self._stream is not None:
            try:  # a copy already queued reads the peer's memory: let it end before anyone frees pages
                self._stream.synchronize()
            except RuntimeError:
                pass
