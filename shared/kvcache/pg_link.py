"""KVLink over a two-party torch.distributed process group: gloo (CPU) or NCCL (GPU).

Runs inside every prefill and decode worker rank (one PGLink per peer pair). Rank 0 of the
group is the prefill (sender), rank 1 the decode (receiver). Built by
`shared.kvcache.rendezvous`; the contract is in `shared.kvcache.link`.

How a transfer runs:
- post (caller thread): one uint8 buffer in the `xfer_buffer` format; a send writes the header
  (from pinned memory, no host sync) and gathers the pages of every layer into the payload,
  then `pg.send`; a recv posts `pg.recv` into an empty buffer. On CUDA this runs on the link's
  side stream. A send's side stream first waits for the caller's current stream (the gather
  must see the KV the forward just wrote); a recv does not, but its later scatter waits for an
  event recorded at post time on the caller's stream. The compute stream never waits for the
  link, and the side stream never waits for NCCL: on CUDA each op gets a completion marker on
  the link's separate done stream (wait for the op, copy the received header to pinned memory,
  record `done`).
- complete (one daemon thread per link, in post order): gloo: Work.wait (the only way gloo p2p
  completes); CUDA: poll `done` (`cuda_wait.wait_event`: bounded, gives up once torn down, checks
  the deadlines and the peer's teardown notice while it waits). Then, under the link lock and
  only while the transfer is PENDING: check the header, queue the scatter on the side stream,
  wait for it, mark DONE/ABORTED.
- teardown (any thread): mark unfinished transfers FAILED, tell the peer (`peer_signal`), abort
  the group in a helper thread (waited for at most ABORT_WAIT_S: NCCL ops of both ends only
  return once both communicators are aborted), wait for the link's own queued gather/scatter
  kernels (bounded; they never depend on the peer). No wait in here can block forever.
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

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.cuda_wait import settle, wait_event
from glmserve.shared.kvcache.link import KVLink, LinkError, LinkStats, TransferTable, XferState
from glmserve.shared.kvcache.link_log import log_teardown
from glmserve.shared.kvcache.peer_signal import PeerSignal
from glmserve.shared.kvcache.send_gate import SendGate, gate_enabled
from glmserve.shared.kvcache.xfer_buffer import (
    HEADER_BYTES, as_page_ids, check_header, gather_pages, new_send_buffer, payload_view, scatter_pages,
)

SENDER, RECEIVER = 0, 1  # group ranks: prefill, decode
ABORT_WAIT_S = 5.0  # teardown waits this long for the group abort, then goes on (noted in abort_error)
SETTLE_S = 5.0  # ... and this long for the link's own gather/scatter kernels
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
    done: torch.cuda.Event | None = None  # CUDA: the op (and the header copy) completed
    header: torch.Tensor | None = None  # host int64 [2]: received (recv, pinned) / source (send)
    sink: Callable[[torch.Tensor], None] | None = None  # recv: payload bytes -> destination
    aborted: bool = False
    state: XferState = XferState.PENDING
    seq: int = 0  # sends: 1-based count of this end's sends (the peer's recv that matches it)


class PGLink(TransferTable, KVLink):
    def __init__(self, pg, rank: int, name: str, device: torch.device | str, timeout_s: float,
                 signal: PeerSignal | None = None, gate: bool | None = None):
        self.pg = pg
        self.rank = rank
        self.peer = 1 - rank
        self.name = name
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.broken = False
        self.error = ""
        self.abort_error = ""  # why the group abort failed or is still running ("" = it returned)
        self.stats = LinkStats()
        self._signal = signal
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever a transfer ends
        self._xfers: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()  # post order
        self._pending: collections.OrderedDict[str, _Xfer] = collections.OrderedDict()  # oldest first
        self._queue: queue.Queue[_Xfer | None] = queue.Queue()
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None  # gathers, scatters
        self._done_stream = torch.cuda.Stream(self.device) if cuda else None  # waits for NCCL only
        self._side_tail: torch.cuda.Event | None = None  # after the last work queued on _stream
        # send gate (shared/kvcache/send_gate.py): ops queued behind a gated send wait their turn
        self._gate = SendGate(signal) if gate_enabled(cuda, signal, gate) else None
        self._deferred = 0  # ops posted but not yet handed to the backend (link thread does it)
        self._thread = threading.Thread(target=self._complete_loop, name=f"kvlink {name}", daemon=True)
        self._thread.start()

    @property
    def gate(self) -> bool:
        """Whether this end's sends wait for the peer's matching recv (send_gate.py)."""
        return self._gate is not None

    # ---- posting (caller thread) ----------------------------------------------------
    def send_pages(self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor) -> None:
        with self._on_stream(wait_compute=True):  # the gather must see the KV the forward wrote
            ids = as_page_ids(page_ids, cache.buffer.device)  # allocated on the side stream: freed safely
            buf, header = new_send_buffer(xfer_id, cache.layout.page_bytes() * ids.numel(), self.device)
            gather_pages(cache, ids, buf)  # [num_layers, num_parts, n, page_size, heads, dim]
            self._post(xfer_id, "send", buf, None, header)

    def recv_pages(
        self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor, discard: bool = False
    ) -> None:
        compute_done = self._compute_event()  # the scatter waits for kernels still reading old owners
        with self._on_stream(wait_compute=False):
            ids = as_page_ids(page_ids, cache.buffer.device)
            sink = None if discard else self._sink(compute_done, lambda p: scatter_pages(cache, ids, p))
            self._post(xfer_id, "recv", self._recv_buf(cache.layout.page_bytes() * ids.numel()), sink)

    def send_tensor(self, xfer_id: str, tensor: torch.Tensor) -> None:
        with self._on_stream(wait_compute=True):
            buf, header = new_send_buffer(xfer_id, tensor.numel() * tensor.element_size(), self.device)
            payload_view(buf, tensor.dtype, tensor.shape).copy_(tensor)
            if self._stream is not None:
                tensor.record_stream(self._stream)  # the caller may free it before the copy ran
            self._post(xfer_id, "send", buf, None, header)

    def recv_tensor(self, xfer_id: str, out: torch.Tensor, discard: bool = False) -> None:
        compute_done = self._compute_event()
        with self._on_stream(wait_compute=False):
            write = lambda p: out.copy_(p.view(out.dtype).view(out.shape))  # noqa: E731
            sink = None if discard else self._sink(compute_done, write)
            self._post(xfer_id, "recv", self._recv_buf(out.numel() * out.element_size()), sink)

    def _recv_buf(self, nbytes: int) -> torch.Tensor:
        return torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=self.device)

    def _sink(self, compute_done: torch.cuda.Event | None, write: Callable[[torch.Tensor], object]):
        def sink(payload: torch.Tensor) -> None:  # CUDA: runs on the side stream
            if compute_done is not None:
                self._stream.wait_event(compute_done)
            write(payload)
        return sink

    def _post(self, xfer_id: str, kind: str, buf: torch.Tensor, sink, header=None) -> None:
        now = time.monotonic()
        x = _Xfer(xfer_id, kind, buf.numel() - HEADER_BYTES, buf, now, now + self.timeout_s,
                  header=header, sink=sink)
        if kind == "recv" and self._gate is not None and not self.broken:
            self._gate.commit_recv()  # before the backend call (send_gate.py says why)
        with self._lock:
            if self.broken:
                raise LinkError(f"KV link {self.name} is broken: {self.error}")
            old = self._xfers.get(xfer_id)
            if old is not None and old.state is XferState.PENDING:
                raise ValueError(f"KV link {self.name}: transfer {xfer_id!r} already in flight")
            err = ""
            if self._gate is not None and kind == "send":
                x.seq = self._gate.next_send()
            if self._gate is not None and (kind == "send" or self._deferred > 0):
                self._deferred += 1  # the link thread posts it (in order) once the gate opens
            else:
                err = self._try_launch_locked(x)
            self._xfers.pop(xfer_id, None)
            self._xfers[xfer_id] = x
            self._pending[xfer_id] = x
            self._prune_locked()
        if err:  # the backend refused the op (peer gone): x ends FAILED with the link, no raise
            self.teardown(err)
            return
        self._queue.put(x)

    def _try_launch_locked(self, x: _Xfer) -> str:
        """_launch_locked; "" or the reason the backend call raised (the caller tears down)."""
        try:
            self._launch_locked(x)
        except Exception as e:  # noqa: BLE001 - e.g. gloo "Connection reset by peer": the peer died
            return f"backend error: posting {x.kind} {x.xfer_id!r} ({x.nbytes} B) failed: {e}"
        return ""

    def _launch_locked(self, x: _Xfer) -> None:
        """Hand x to the backend (under the lock, in post order). CUDA: on the side stream, so
        NCCL waits for the gather queued there."""
        op = self.pg.send if x.kind == "send" else self.pg.recv
        if self._stream is None:
            x.work = op([x.buf], self.peer, 0)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            x.work = op([x.buf], self.peer, 0)
            self._side_tail = _record(self._stream)
            self._mark_completion(x)

    def _mark_completion(self, x: _Xfer) -> None:
        """CUDA: on the done stream, wait for the op, copy a received header to pinned host
        memory, record x.done. Only the done stream waits for NCCL (never the side stream)."""
        with torch.cuda.stream(self._done_stream):
            x.work.wait()
            if x.kind == "recv":
                x.header = torch.empty(2, dtype=torch.int64, pin_memory=True)
                x.header.copy_(x.buf[:HEADER_BYTES].view(torch.int64), non_blocking=True)
            x.done = _record(self._done_stream)

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
        return None if self._stream is None else _record(torch.cuda.current_stream(self.device))

    # ---- completion (link thread) ---------------------------------------------------
    def _complete_loop(self) -> None:
        while (x := self._queue.get()) is not None:
            if self.broken:
                continue  # torn down: its ops are FAILED and the group aborted; wait for none
            if x.work is None and not self._launch_deferred(x):
                continue
            err = self._await_op(x)
            if err:
                self.teardown(err)
            if err is None or err or not self._scatter(x):
                continue
            with self._lock:
                if x.state is XferState.PENDING:
                    self._mark_locked(x, XferState.ABORTED if x.aborted else XferState.DONE)

    def _launch_deferred(self, x: _Xfer) -> bool:
        """A gated op: wait until the peer posted the recv matching a send, then hand it to the
        backend; its deadline restarts there (the gate wait had its own, from posting). False
        when the link was torn down meanwhile."""
        if x.kind == "send" and not self._gate.wait_open(x.seq, lambda: self.broken, self._while_slow):
            return False
        with self._lock:
            if self.broken or x.state is not XferState.PENDING:
                return False
            err = self._try_launch_locked(x)
            self._deferred -= 1
            x.deadline = time.monotonic() + self.timeout_s
        if err:
            self.teardown(err)
            return False
        return True

    def _await_op(self, x: _Xfer) -> str | None:
        """Wait for x's op: "" when it completed (and a recv's header matches), else the error;
        None when the link was torn down meanwhile."""
        try:
            if self._stream is None:
                x.work.wait()
                header = x.buf[:HEADER_BYTES].view(torch.int64)
            elif wait_event(x.done, lambda: self.broken, self._while_slow):
                header = x.header
            else:
                return None
        except Exception as e:  # noqa: BLE001 - any backend error breaks the link
            return f"backend error: {x.kind} {x.xfer_id!r} ({x.nbytes} B) failed after " \
                   f"{time.monotonic() - x.posted:.1f} s: {e}"
        bad = "" if x.kind == "send" else check_header(x.xfer_id, x.nbytes, header)
        return f"header mismatch: {bad}" if bad else ""

    def _while_slow(self, waited_s: float) -> bool:
        """Asked while an op is slow: fire deadlines and honour the peer's teardown notice
        (True = torn down, stop waiting), also when no caller polls."""
        self._check_deadlines()
        reason = None if self.broken or self._signal is None else self._signal.peer_down()
        if reason is not None:
            self.teardown(f"the peer tore the link down ({reason}); this end waited {waited_s:.1f} s")
        return self.broken

    def _scatter(self, x: _Xfer) -> bool:
        """Write a completed recv into its destination unless aborted; False if torn down."""
        with self._lock:
            if x.state is not XferState.PENDING:
                return False
            if x.sink is None or x.aborted:
                return True
            if self._stream is None:
                x.sink(x.buf[HEADER_BYTES:])
                return True
            with torch.cuda.stream(self._stream):  # not _on_stream: never wait for the compute stream
                self._stream.wait_event(x.done)
                x.sink(x.buf[HEADER_BYTES:])
                event = self._side_tail = _record(self._stream)
        return wait_event(event, lambda: self.broken)

    def _mark_locked(self, x: _Xfer, state: XferState) -> None:
        self._ended_locked(x, state)
        x.sink = None
        if state is not XferState.FAILED:  # a torn-down op may still touch its buffer: keep it referenced
            x.buf, x.work, x.header = _EMPTY, None, None  # free the payload now; the entry stays for poll()

    # ---- state (caller thread) ------------------------------------------------------
    def teardown(self, reason: str) -> None:
        """Fail every unfinished transfer, tell the peer, abort the group; afterwards the link
        writes no page. Every wait in here is bounded (see the module docstring)."""
        stuck = self._fail_all(reason)
        if stuck is None:
            return
        with self._lock:
            tail = self._side_tail  # no op is posted on a broken link: this is the last one
        log_teardown(self.name, reason, stuck, self.stats)
        self._abort_group(reason)
        if not settle(tail, SETTLE_S):
            self.abort_error += f"; link kernels still queued after {SETTLE_S:g} s"
        if self.abort_error:
            log_teardown(self.name, f"after teardown ({reason})", [], self.stats, self.abort_error)
        self._queue.put(None)
        if not stuck and threading.current_thread() is not self._thread:
            # let the completion thread end now: if it held the last reference at interpreter
            # exit, the group's destructor would run in a dying thread (std::terminate)
            self._thread.join(timeout=5.0)

    def _abort_group(self, reason: str) -> None:
        """Notice to the peer, then pg.abort(), in a helper thread waited for ABORT_WAIT_S."""
        def run() -> None:
            if self._signal is not None:
                self._signal.mark_down(reason)
            try:
                self.pg.abort()
            except Exception as e:  # noqa: BLE001 - reported, the link is broken anyway
                self.abort_error = f"abort failed: {type(e).__name__}: {e}"

        helper = threading.Thread(target=run, name=f"kvlink abort {self.name}", daemon=True)
        helper.start()
        helper.join(ABORT_WAIT_S)
        if helper.is_alive():
            self.abort_error = f"group abort still running after {ABORT_WAIT_S:g} s"


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event
