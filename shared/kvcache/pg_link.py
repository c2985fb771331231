"""KVLink over a two-party torch.distributed process group: gloo (CPU) or NCCL (GPU).

Runs inside every prefill and decode worker rank (one PGLink per peer pair). Rank 0 of the
group is the prefill (sender), rank 1 the decode (receiver). Built by
`shared.kvcache.rendezvous`; the contract is in `shared.kvcache.link`.

How a transfer runs:
- post (caller thread): one uint8 buffer in the `xfer_buffer` format; a send writes the header
  and gathers the pages of every layer into the payload, then `pg.send`; a recv posts `pg.recv`
  into an empty buffer. On CUDA this all runs on the link's own stream. A send's stream first
  waits for the caller's current stream (the gather must see the KV the forward just wrote); a
  recv does not (it starts at once), but its later scatter waits for an event recorded at post
  time on the caller's stream (kernels still reading the pages' previous owner). The compute
  stream never waits for the link.
- complete (one daemon thread per link, in post order): wait for the op (gloo: Work.wait, which
  is the only way gloo p2p completes; NCCL: the side stream waits, then the header is read);
  under the link lock, if the transfer is still PENDING: check the header, scatter the payload
  into its pages (unless aborted/discarded), then mark DONE/ABORTED. teardown() takes the same
  lock, so once it returned no scatter can start; on CUDA it also drains the side stream.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shared.kvcache.cache import PagedKVCache
from shared.kvcache.link import KVLink, LinkError, LinkStats, XferState
from shared.kvcache.xfer_buffer import (
    HEADER_BYTES, as_page_ids, check_header, new_send_buffer, pages_shape, payload_view,
)

KEEP_TERMINAL = 65536  # finished transfers remembered for poll() before the oldest is dropped
SENDER, RECEIVER = 0, 1  # group ranks: prefill, decode
_EMPTY = torch.empty(0, dtype=torch.uint8)


@dataclass
class _Xfer:
    xfer_id: str
    kind: str  # "send" | "recv"
    nbytes: int  # payload bytes (header excluded)
    buf: torch.Tensor  # uint8 [HEADER_BYTES + nbytes], alive until the op completed
    posted: float
    deadline: float
    work: object = None
    sink: Callable[[torch.Tensor], None] | None = None  # recv: payload bytes -> destination
    aborted: bool = False
    state: XferState = XferState.PENDING


class PGLink(KVLink):
    def __init__(self, pg, rank: int, name: str, device: torch.device | str, timeout_s: float):
        self.pg = pg
        self.rank = rank
        self.peer = 1 - rank
        self.name = name
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.broken = False
        self.error = ""
        self.stats = LinkStats()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a transfer ends
        self._xfers: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()  # post order
        self._pending: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()  # oldest first
        self._queue: queue.Queue[_Xfer | None] = queue.Queue()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._complete_loop, name=f"kvlink {name}", daemon=True)
        self._thread.start()

    # ---- posting (caller thread) ----------------------------------------------------
    def send_pages(self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor) -> None:
        with self._on_stream(wait_compute=True):  # the gather must see the KV the forward wrote
            ids = as_page_ids(page_ids, cache.buffer.device)  # allocated on the side stream: freed safely
            shape = pages_shape(cache, ids.numel())
            buf = self._new_buf(xfer_id, cache.layout.page_bytes() * ids.numel())
            # [num_layers, num_parts, n, page_size, heads, dim] gathered straight into the buffer
            torch.index_select(cache.buffer, 2, ids, out=payload_view(buf, cache.buffer.dtype, shape))
            self._post(xfer_id, "send", buf, None)

    def recv_pages(
        self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor, discard: bool = False
    ) -> None:
        # the recv itself never waits for the compute stream (it fills a fresh buffer); only the
        # scatter waits for the compute work posted before this call (kernels still reading the
        # pages' previous owner)
        compute_done = self._compute_event()
        with self._on_stream(wait_compute=False):
            ids = as_page_ids(page_ids, cache.buffer.device)
            shape = pages_shape(cache, ids.numel())

            def sink(payload: torch.Tensor) -> None:
                if compute_done is not None:
                    self._stream.wait_event(compute_done)
                cache.buffer.index_copy_(2, ids, payload.view(cache.buffer.dtype).view(shape))

            buf = torch.empty(HEADER_BYTES + cache.layout.page_bytes() * ids.numel(), dtype=torch.uint8, device=self.device)
            self._post(xfer_id, "recv", buf, None if discard else sink)

    def send_tensor(self, xfer_id: str, tensor: torch.Tensor) -> None:
        with self._on_stream(wait_compute=True):
            buf = self._new_buf(xfer_id, tensor.numel() * tensor.element_size())
            payload_view(buf, tensor.dtype, tensor.shape).copy_(tensor)
            if self._stream is not None:
                tensor.record_stream(self._stream)  # the caller may free it before the copy ran
            self._post(xfer_id, "send", buf, None)

    def recv_tensor(self, xfer_id: str, out: torch.Tensor, discard: bool = False) -> None:
        compute_done = self._compute_event()

        def sink(payload: torch.Tensor) -> None:
            if compute_done is not None:
                self._stream.wait_event(compute_done)
            out.copy_(payload.view(out.dtype).view(out.shape))

        with self._on_stream(wait_compute=False):
            buf = torch.empty(HEADER_BYTES + out.numel() * out.element_size(), dtype=torch.uint8, device=self.device)
            self._post(xfer_id, "recv", buf, None if discard else sink)

    def _new_buf(self, xfer_id: str, nbytes: int) -> torch.Tensor:
        return new_send_buffer(xfer_id, nbytes, self.device)

    def _post(self, xfer_id: str, kind: str, buf: torch.Tensor, sink) -> None:
        now = time.monotonic()
        x = _Xfer(xfer_id, kind, buf.numel() - HEADER_BYTES, buf, now, now + self.timeout_s, sink=sink)
        with self._lock:
            if self.broken:
                raise LinkError(f"KV link {self.name} is broken: {self.error}")
            old = self._xfers.get(xfer_id)
            if old is not None and old.state is XferState.PENDING:
                raise ValueError(f"KV link {self.name}: transfer {xfer_id!r} already in flight")
            op = self.pg.send if kind == "send" else self.pg.recv
            x.work = op([buf], self.peer, 0)
            self._xfers.pop(xfer_id, None)
            self._xfers[xfer_id] = x
            self._pending[xfer_id] = x
            self._prune_locked()
        self._queue.put(x)

    @contextlib.contextmanager
    def _on_stream(self, wait_compute: bool):
        """Run the block on the link's side stream (CUDA); wait_compute: first order it after
        the work already queued on the caller's current stream."""
        if self._stream is None:
            yield
            return
        if wait_compute:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield

    def _compute_event(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the caller's current stream (CUDA only)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ---- completion (link thread) ---------------------------------------------------
    def _complete_loop(self) -> None:
        while (x := self._queue.get()) is not None:
            if self.broken:
                continue  # torn down: its ops are FAILED and the group aborted; wait for none
            try:
                header = self._wait_op(x)
                err = "" if x.kind == "send" else check_header(x.xfer_id, x.nbytes, header)
            except Exception as e:  # noqa: BLE001 - any backend error breaks the link
                err = f"{x.kind} {x.xfer_id!r} failed: {e}"
            if err:
                self.teardown(err)
                continue
            event = self._finish_locked_part(x)
            if event is not None:
                event.synchronize()
            with self._lock:
                if x.state is XferState.PENDING:
                    self._mark_locked(x, XferState.ABORTED if x.aborted else XferState.DONE)

    def _wait_op(self, x: _Xfer) -> torch.Tensor | None:
        """Block until the op completed; returns the received header (recv) as int64 [2] on CPU."""
        if self._stream is None:
            x.work.wait()
            return x.buf[:HEADER_BYTES].view(torch.int64) if x.kind == "recv" else None
        with torch.cuda.stream(self._stream):
            x.work.wait()  # the side stream waits for NCCL's stream
            if x.kind == "send":
                self._stream.synchronize()
                return None
            return x.buf[:HEADER_BYTES].view(torch.int64).cpu()  # syncs the side stream

    def _finish_locked_part(self, x: _Xfer) -> torch.cuda.Event | None:
        """Scatter a completed recv into its destination unless torn down or aborted meanwhile."""
        with self._lock:
            if x.state is not XferState.PENDING or x.sink is None or x.aborted:
                return None
            if self._stream is None:
                x.sink(x.buf[HEADER_BYTES:])
                return None
            with torch.cuda.stream(self._stream):  # not _on_stream: never wait for the compute stream
                x.sink(x.buf[HEADER_BYTES:])
                event = torch.cuda.Event()
                event.record(self._stream)
                return event

    def _mark_locked(self, x: _Xfer, state: XferState) -> None:
        x.state = state
        self._pending.pop(x.xfer_id, None)
        self._changed.notify_all()
        x.sink = None
        if state is XferState.FAILED:
            return  # buf and work stay referenced: a torn-down op may still touch its buffer
        x.buf, x.work = _EMPTY, None  # free the payload now; the entry stays for poll()
        s = self.stats
        s.seconds += time.monotonic() - x.posted
        if x.kind == "send":
            s.num_sent, s.bytes_sent = s.num_sent + 1, s.bytes_sent + x.nbytes
        else:
            s.num_recv, s.bytes_recv = s.num_recv + 1, s.bytes_recv + x.nbytes

    # ---- state (caller thread) ------------------------------------------------------
    def poll(self, xfer_id: str) -> XferState:
        self._check_deadlines()
        with self._lock:
            x = self._xfers.get(xfer_id)
            return XferState.UNKNOWN if x is None else x.state

    def wait(self, xfer_id: str, timeout_s: float | None = None) -> XferState:
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.poll(xfer_id)  # also fires deadlines
            now = time.monotonic()
            if state is not XferState.PENDING or (end is not None and now > end):
                return state
            with self._lock:
                x = self._xfers.get(xfer_id)
                if x is not None and x.state is XferState.PENDING:
                    limit = x.deadline if end is None else min(end, x.deadline)
                    self._changed.wait(max(0.0, min(limit - now, 1.0)) + 0.001)

    def abort(self, xfer_id: str) -> None:
        with self._lock:
            x = self._xfers.get(xfer_id)
            if x is not None and x.state is XferState.PENDING:
                x.aborted = True

    def forget(self, xfer_id: str) -> None:
        with self._lock:
            x = self._xfers.get(xfer_id)
            if x is not None and x.state.terminal:
                del self._xfers[xfer_id]

    def num_pending(self) -> int:
        self._check_deadlines()
        with self._lock:
            return len(self._pending)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:  # one timeout for all: the oldest pending transfer has the first deadline
            oldest = next(iter(self._pending.values()), None)
            late = oldest if oldest is not None and now > oldest.deadline else None
        if late is not None:
            self.teardown(f"{late.kind} {late.xfer_id!r} timed out after {self.timeout_s:g} s")

    def _prune_locked(self) -> None:
        while len(self._xfers) > KEEP_TERMINAL:
            oldest = next(iter(self._xfers.values()))
            if not oldest.state.terminal:
                return
            self._xfers.popitem(last=False)

    def teardown(self, reason: str) -> None:
        """Abort the group, fail every unfinished transfer; afterwards the link writes no page."""
        with self._lock:
            if self.broken:
                return
            self.broken, self.error = True, reason
            stuck = list(self._pending.values())
            for x in stuck:
                self._mark_locked(x, XferState.FAILED)
        with contextlib.suppress(Exception):
            self.pg.abort()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.synchronize()
        self._queue.put(None)
        if not stuck and threading.current_thread() is not self._thread:
            # let the completion thread end now: if it held the last reference at interpreter
            # exit, the group's destructor would run in a dying thread (std::terminate)
            self._thread.join(timeout=5.0)

