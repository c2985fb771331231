"""The router's view of its workers: readiness and load from `WorkerStatus` heartbeats.

Runs in the router process (pure Python, no IO; the dispatcher feeds it). A worker is
ready while its last heartbeat said ready and arrived less than `timeout_s` ago. Between
heartbeats (0.5 s) the router adds what it sent itself, so a burst does not all land on the
worker that looked emptiest at the last heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.shared.protocol import WorkerStatus


@dataclass
class WorkerState:
    worker_id: str
    role: str  # "prefill" | "decode"
    addr: str  # control address (the router's PUSH connects here)
    last_seen: float = -1.0  # monotonic seconds of the last heartbeat; -1 = never
    reported_ready: bool = False
    status: WorkerStatus | None = None
    # sent by the router since the last heartbeat (decode: reservations, prefill: prompt tokens)
    sent_since_status: int = 0
    busy: bool = False  # answered Busy since its last heartbeat: skip it until the next one
    inflight: set[str] = field(default_factory=set)  # rids the router has on this worker

    def alive(self, now: float, timeout_s: float) -> bool:
        return self.last_seen >= 0 and now - self.last_seen < timeout_s

    def ready(self, now: float, timeout_s: float) -> bool:
        return self.reported_ready and self.alive(now, timeout_s)


class WorkerRegistry:
    def __init__(self, prefill: dict[str, str], decode: dict[str, str], timeout_s: float):
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerState] = {}
        for wid, addr in prefill.items():
            self.workers[wid] = WorkerState(wid, "prefill", addr)
        for wid, addr in decode.items():
            if wid in self.workers:
                raise ValueError(f"worker id {wid!r} is both prefill and decode")
            self.workers[wid] = WorkerState(wid, "decode", addr)

    def on_status(self, st: WorkerStatus, now: float) -> bool:
        """Record a heartbeat; False when it comes from a worker that is not configured."""
        w = self.workers.get(st.worker_id)
        if w is None or w.role != st.role:
            return False
        w.last_seen, w.reported_ready, w.status = now, st.ready, st
        w.sent_since_status, w.busy = 0, False
        return True

    def restarted(self, st: WorkerStatus) -> bool:
        """True when this heartbeat comes from a new process under a known id (checked before
        on_status). Uses WorkerStatus.instance."""
        w = self.workers.get(st.worker_id)
        old = w.status.instance if w is not None and w.status is not None else ""
        new = st.instance
        return bool(old and new and old != new)

    def ready(self, role: str, now: float) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.ready(now, self.timeout_s)]

    def readiness(self, now: float) -> tuple[bool, str]:
        """Ready to serve: at least one ready prefill and one ready decode."""
        p, d = self.ready("prefill", now), self.ready("decode", now)
        if p and d:
            return True, f"{len(p)} prefill and {len(d)} decode workers ready"
        return False, f"ready workers: {len(p)} prefill, {len(d)} decode (need >= 1 of each)"

    def expired(self, now: float) -> list[WorkerState]:
        """Workers seen once but silent for `timeout_s` (dead or hung) that still hold requests."""
        return [w for w in self.workers.values()
                if w.last_seen >= 0 and not w.alive(now, self.timeout_s) and w.inflight]

    def pick_decode(self, now: float, exclude: set[str], avoid: set[str] = frozenset()) -> WorkerState | None:
        """The ready, not-busy decode with the most free pages, then the fewest running; never one
        in `exclude`, one in `avoid` only when no other can take it."""
        ready = [w for w in self.ready("decode", now) if not w.busy and w.worker_id not in exclude]
        cands = [w for w in ready if w.worker_id not in avoid] or ready
        if not cands:
            return None

        def score(w: WorkerState) -> tuple:
            st = w.status
            return (st.free_pages, -(st.running + len(w.inflight) + w.sent_since_status), w.worker_id)

        best = max(cands, key=score)
        best.sent_since_status += 1
        return best

    def pick_prefill(self, now: float, num_tokens: int, avoid: set[str] = frozenset()) -> WorkerState | None:
        """The ready prefill with the fewest queued prompt tokens (its report plus what we sent since);
        workers in `avoid` only when no other is ready."""
        ready = self.ready("prefill", now)
        cands = [w for w in ready if w.worker_id not in avoid] or ready
        if not cands:
            return None
        best = min(cands, key=lambda w: (w.status.queued_tokens + w.sent_since_status, w.worker_id))
        best.sent_since_status += num_tokens
        return best

    def summary(self, now: float) -> dict:
        return {
            wid: {"role": w.role, "ready": w.ready(now, self.timeout_s),
                  "seconds_since_heartbeat": None if w.last_seen < 0 else round(now - w.last_seen, 3),
                  "inflight": len(w.inflight),
                  "free_pages": w.status.free_pages if w.status else None,
                  "running": w.status.running if w.status else None,
                  "queued_tokens": w.status.queued_tokens if w.status else None}
            for wid, w in self.workers.items()
        }
