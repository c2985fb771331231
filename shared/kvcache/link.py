"""The KVLink interface: moves KV pages and small tensors from one prefill rank to one decode rank.

One link per (prefill worker, decode worker, TP rank i) pair: prefill rank i sends, decode rank i
receives (every TP rank moves its own KV shard). Both worker processes hold one end. Backends:
`shared.kvcache.pg_link.PGLink` over a two-party torch.distributed ProcessGroup, gloo on CPU and
NCCL on GPU; `shared.kvcache.rendezvous` builds them (signature check, warm-up).

Contract (both ends):
- Transfers are ORDERED: the sender and the receiver post their transfers of a link in the same
  order (the decode learns the order from KVChunkReady on ZeroMQ). Every announced transfer must
  be received, also for an aborted request (`recv_pages(..., discard=True)`), or the order breaks.
- `send_pages(xfer_id, cache, page_ids)` gathers the pages of every layer into one contiguous
  buffer ([16-byte header | num_layers, num_parts, n, page_size, heads, dim]) and posts one send;
  `recv_pages` posts one recv of the same size and, once it completed and its header names the
  same xfer_id and size, scatters it into the given pages. A recv never writes a cache page
  before its bytes fully arrived and were checked, so failing/aborted recvs leave pages untouched.
- `send_tensor` / `recv_tensor(xfer_id, out)`: same for a small tensor (the MTP seed hidden state);
  `out` is filled in place once the transfer is DONE.
- Every call returns at once; `poll(xfer_id)` says PENDING, DONE, ABORTED or FAILED (UNKNOWN for
  an id never posted or already forgotten). Terminal states are kept until `forget(xfer_id)`
  (the newest 65536 are kept in any case).
- Source pages may be reused only after poll() said DONE/ABORTED/FAILED for their send (gloo
  copies them at post time; NCCL reads them on a side stream later).
- `abort(xfer_id)`: the request no longer wants the data. The transfer cannot be cancelled
  (NCCL cannot cancel a posted op); it still completes, a recv is then not scattered, and poll
  says ABORTED. Pages may be freed once poll is terminal.
- Every transfer has a deadline (`timeout_s` after posting). poll() past the deadline tears the
  link down: the process group is aborted, every unfinished transfer becomes FAILED, `broken`
  is True, and no page is written by the link afterwards. The peer notices by its own deadline
  or the control plane; both ends then build a new link (rendezvous with a fresh attempt).
- `close()` tears down at once (same effect, reason "closed"); idempotent.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from glmserve.shared.kvcache.cache import KVLayout, PagedKVCache


class XferState(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"
    ABORTED = "aborted"  # completed, data dropped (recv) or not needed (send)
    FAILED = "failed"  # link broken or deadline passed; the link is torn down
    UNKNOWN = "unknown"  # never posted on this link, or forgotten

    @property
    def terminal(self) -> bool:
        return self in (XferState.DONE, XferState.ABORTED, XferState.FAILED)


class LinkError(RuntimeError):
    """The link could not be built, or it is broken."""


class LinkMismatch(LinkError):
    """The two ends describe different models/caches; the message says which fields differ."""


@dataclass(frozen=True)
class LinkSignature:
    """What both ends must agree on before any byte moves (exchanged at rendezvous)."""

    model_name: str  # e.g. the checkpoint's model_type + name; equal strings required
    dtype: str  # "bfloat16" ...
    page_size: int
    num_layers: int  # cache layers, MTP layer included
    kv_layout: str  # "parts=1,heads=1,dim=576" (per-rank shape of one token's KV in one layer)
    tp_size: int

    @staticmethod
    def for_cache(model_name: str, layout: KVLayout, tp_size: int) -> "LinkSignature":
        return LinkSignature(
            model_name=model_name,
            dtype=str(layout.dtype).removeprefix("torch."),
            page_size=layout.page_size,
            num_layers=layout.num_layers,
            kv_layout=f"parts={layout.num_parts},heads={layout.local_kv_heads},dim={layout.entry_dim}",
            tp_size=tp_size,
        )

    def to_json_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def differences(self, other: "LinkSignature", mine: str = "prefill", theirs: str = "decode") -> list[str]:
        """One text per differing field, e.g. "page_size differs (prefill 16, decode 32)"."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name} differs ({mine} {a!r}, {theirs} {b!r})")
        return out


@dataclass
class LinkStats:
    num_sent: int = 0
    num_recv: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    seconds: float = 0.0  # sum of post -> completion times of finished transfers


class KVLink(abc.ABC):
    """One end of a prefill-rank -> decode-rank link. See the module docstring for the contract."""

    name: str  # "p0->d0/r0"
    broken: bool
    error: str  # why the link is broken ("" while it works)
    stats: LinkStats

    @abc.abstractmethod
    def send_pages(self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor) -> None: ...

    @abc.abstractmethod
    def recv_pages(
        self, xfer_id: str, cache: PagedKVCache, page_ids: Sequence[int] | torch.Tensor, discard: bool = False
    ) -> None: ...

    @abc.abstractmethod
    def send_tensor(self, xfer_id: str, tensor: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def recv_tensor(self, xfer_id: str, out: torch.Tensor, discard: bool = False) -> None: ...

    @abc.abstractmethod
    def poll(self, xfer_id: str) -> XferState: ...

    @abc.abstractmethod
    def wait(self, xfer_id: str, timeout_s: float | None = None) -> XferState:
        """Block until the transfer is terminal (or the deadline tears the link down)."""

    @abc.abstractmethod
    def abort(self, xfer_id: str) -> None: ...

    @abc.abstractmethod
    def forget(self, xfer_id: str) -> None: ...

    @abc.abstractmethod
    def num_pending(self) -> int: ...

    @abc.abstractmethod
    def stuck_report(self, older_than_s: float) -> str | None:
        """A line on what the oldest unfinished transfer waits for, once older than older_than_s."""

    @abc.abstractmethod
    def teardown(self, reason: str) -> None: ...

    def close(self) -> None:
        self.teardown("closed")


KEEP_TERMINAL = 65536  # finished transfers remembered for poll() before the oldest is dropped


class TransferTable:
    """The transfer table both KVLink backends keep: poll / wait / abort / forget / num_pending, the
    deadline check, pruning, per-transfer stats and the first half of a teardown.

    The backend holds `_lock` (a Lock), `_changed` (a Condition on it, notified when a transfer ends),
    `_xfers` (xfer id -> record with .xfer_id, .kind, .nbytes, .posted, .deadline, .state, .aborted;
    post order), `_pending` (the unfinished ones, oldest first), `stats`, `broken`, `error`, `timeout_s`,
    and defines `_mark_locked(x, state)` (end a transfer: at least `_ended_locked`) and
    `teardown(reason)` (which starts with `_fail_all`)."""

    DEADLINE_SLACK_S = 0.0  # past a transfer's deadline by this much, poll() tears the link down

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:  # one timeout for all: the oldest pending transfer has the first deadline
            oldest = next(iter(self._pending.values()), None)
            late = oldest if oldest is not None and now > oldest.deadline + self.DEADLINE_SLACK_S else None
        if late is not None:
            self.teardown(f"{late.kind} {late.xfer_id!r} timed out after {self.timeout_s:g} s "
                          f"(deadline; {late.nbytes} B, posted {now - late.posted:.1f} s ago)")

    def _prune_locked(self) -> None:
        while len(self._xfers) > KEEP_TERMINAL:
            oldest = next(iter(self._xfers.values()))
            if not oldest.state.terminal:
                return
            self._xfers.popitem(last=False)

    def _ended_locked(self, x, state: XferState) -> None:
        """x is `state` now: out of the pending set, waiters woken, counted in stats unless FAILED."""
        x.state = state
        self._pending.pop(x.xfer_id, None)
        self._changed.notify_all()
        if state is XferState.FAILED:
            return
        s = self.stats
        s.seconds += time.monotonic() - x.posted
        if x.kind == "send":
            s.num_sent, s.bytes_sent = s.num_sent + 1, s.bytes_sent + x.nbytes
        else:
            s.num_recv, s.bytes_recv = s.num_recv + 1, s.bytes_recv + x.nbytes

    def _fail_all(self, reason: str) -> list | None:
        """Mark the link broken and every unfinished transfer FAILED; the failed ones, or None if the
        link was broken already (the teardown is someone else's)."""
        with self._lock:
            if self.broken:
                return None
            self.broken, self.error = True, reason
            stuck = list(self._pending.values())
            for x in stuck:
                self._mark_locked(x, XferState.FAILED)
            return stuck

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

    def stuck_report(self, older_than_s: float) -> str | None:
        """One line on the link when its oldest unfinished transfer was posted more than older_than_s
        ago (workers log it long before the deadline fails the transfer), else None."""
        with self._lock:
            oldest = next(iter(self._pending.values()), None)
            n = len(self._pending)
        if oldest is None or time.monotonic() - oldest.posted < older_than_s:
            return None
        return (f"{n} unfinished, oldest {oldest.kind} {oldest.xfer_id!r} posted "
                f"{time.monotonic() - oldest.posted:.1f} s ago{self._state_note()}")

    def _state_note(self) -> str:
        """Backend detail for stuck_report (e.g. the IPC control block's counters)."""
        return ""

    def num_pending(self) -> int:
        self._check_deadlines()
        with self._lock:
            return len(self._pending)
