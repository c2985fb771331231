"""Per-request KV handoff state machine, the same on both ends (prefill and decode worker leaders).

    RESERVED ──post──▶ TRANSFERRING ──all transfers done, last posted──▶ DONE
        │                   │
        ├── deadline ───────┴── deadline / link failure ──▶ FAILED
        └── abort ──────────┴── abort (after in-flight transfers finish) ──▶ ABORTED

- States only move forward (the enum order); DONE, FAILED and ABORTED are terminal.
- Every waiting state has a deadline: RESERVED `reserve_timeout_s` after open (the decode waits
  for the prefill to start pushing), TRANSFERRING `transfer_timeout_s` after the latest post.
- A deadline passing while a transfer is in flight tears the link down (KVLink.teardown) BEFORE
  the request's pages are released: no page is reused while a link could still read or write it.
  Every other handoff with a transfer on that link then fails on its next poll.
- abort() while transfers are in flight marks them aborted (a recv is then not scattered), lets
  them finish, then the handoff becomes ABORTED and its pages are released.
- Pages: the table owns a PageAllocator and releases `rid`'s pages exactly once: on FAILED and
  ABORTED always; on DONE only when `release_on_done` (the prefill: its source pages are free once
  every send completed; the decode keeps them for decoding and releases them at finish).
  `release(rid)` is idempotent.

Pure Python apart from the KVLink calls; `clock` is injectable for tests.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.kvcache.allocator import PageAllocator
from shared.kvcache.link import KVLink, XferState


class HandoffState(enum.IntEnum):
    RESERVED = 0
    TRANSFERRING = 1
    DONE = 2
    FAILED = 3
    ABORTED = 4

    @property
    def terminal(self) -> bool:
        return self >= HandoffState.DONE


@dataclass
class Handoff:
    rid: str
    state: HandoffState
    deadline: float
    link: KVLink | None = None
    pending: set[str] = field(default_factory=set)  # posted transfer ids not yet terminal
    closed: bool = False  # the last transfer is posted; no more follow
    abort_requested: bool = False
    reason: str = ""  # why FAILED / ABORTED
    released: bool = False

    def advance(self, to: HandoffState, reason: str = "") -> None:
        if self.state.terminal or to <= self.state:
            raise ValueError(f"handoff {self.rid}: {self.state.name} -> {to.name} is not a forward move")
        self.state, self.reason = to, reason or self.reason


class HandoffTable:
    def __init__(self, allocator: PageAllocator, release_on_done: bool, reserve_timeout_s: float = 60.0,
                 transfer_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.allocator = allocator
        self.release_on_done = release_on_done
        self.reserve_timeout_s = reserve_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.clock = clock
        self.handoffs: dict[str, Handoff] = {}  # every handoff not yet terminal

    def open(self, rid: str) -> Handoff:
        """A request whose pages (already allocated under rid) wait for their first transfer."""
        if rid in self.handoffs:
            raise ValueError(f"handoff {rid} already open")
        h = Handoff(rid, HandoffState.RESERVED, self.clock() + self.reserve_timeout_s)
        self.handoffs[rid] = h
        return h

    def posted(self, rid: str, link: KVLink, xfer_id: str, last: bool = False) -> None:
        """Record a transfer the caller just posted on `link` (send_pages / recv_pages / *_tensor)."""
        h = self.handoffs[rid]
        if h.closed:
            raise ValueError(f"handoff {rid}: transfer {xfer_id} posted after the last one")
        if h.link is not None and h.link is not link:
            raise ValueError(f"handoff {rid}: transfers on two links")
        h.link = link
        h.pending.add(xfer_id)
        h.closed = last
        if h.abort_requested:
            link.abort(xfer_id)
        if h.state is HandoffState.RESERVED:
            h.advance(HandoffState.TRANSFERRING)
        h.deadline = self.clock() + self.transfer_timeout_s

    def close(self, rid: str) -> None:
        """No more transfers follow (e.g. the last push had no pages)."""
        self.handoffs[rid].closed = True

    def abort(self, rid: str, reason: str = "abort") -> Handoff | None:
        """Give the request up: at once when nothing is in flight, else after its transfers end."""
        h = self.handoffs.get(rid)
        if h is None:
            return None
        h.abort_requested, h.reason = True, reason
        for x in h.pending:
            h.link.abort(x)
        return h

    def poll(self) -> list[Handoff]:
        """Advance every open handoff; returns (and forgets) those that became terminal now."""
        now = self.clock()
        done = [h for h in list(self.handoffs.values()) if self._step(h, now)]
        for h in done:
            del self.handoffs[h.rid]
            if h.state is not HandoffState.DONE or self.release_on_done:
                self.release(h)
        return done

    def _step(self, h: Handoff, now: float) -> bool:
        failure = self._collect(h)
        if failure:
            h.advance(HandoffState.FAILED, failure)
        elif not h.pending and (h.closed or h.abort_requested):
            if h.abort_requested:
                h.advance(HandoffState.ABORTED)
            else:
                h.advance(HandoffState.DONE)
        elif now > h.deadline:
            if h.pending:  # nothing may touch the pages again before they are released
                h.link.teardown(f"handoff {h.rid} timed out in {h.state.name}")
            h.advance(HandoffState.FAILED, f"timeout in {h.state.name}")
        return h.state.terminal

    @staticmethod
    def _collect(h: Handoff) -> str:
        """Drop finished transfers from h.pending; a failure text when one failed."""
        for x in list(h.pending):
            state = h.link.poll(x)
            if state is XferState.PENDING:
                continue
            h.pending.discard(x)
            h.link.forget(x)
            if state in (XferState.FAILED, XferState.UNKNOWN):
                h.pending.clear()  # the link is torn down: nothing of it is in flight any more
                return f"transfer {x} {state.value}: {h.link.error}"
        return ""

    def release(self, h: Handoff | str) -> int:
        """Free the request's pages once; later calls return 0."""
        if isinstance(h, str):
            h = self.handoffs.get(h) or Handoff(h, HandoffState.DONE, 0.0)
        if h.released:
            return 0
        h.released = True
        return self.allocator.release(h.rid)

    def check_idle(self) -> list[str]:
        """Problems of an idle worker: open handoffs and leaked pages (empty when all is well)."""
        out = [f"handoff {rid} still {h.state.name}" for rid, h in self.handoffs.items()]
        out += [f"{len(leak.page_ids)} pages leaked by {leak.owner}" for leak in self.allocator.check_idle()]
        return out
