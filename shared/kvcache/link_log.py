"""Diagnostics of KV-link failures, logged at WARNING by `PGLink.teardown` (every prefill and
decode worker rank that holds a link end).

A teardown line names the link, the reason (deadline / peer down / header mismatch / backend
error / closed), every transfer that was still unfinished (kind, id, payload bytes, seconds since
it was posted) and the link's totals. For a deadline or a peer's teardown notice it also logs
the Python stack of every thread of the process: a transfer that never completes on GPU is
usually an end whose main thread is stuck (e.g. in a device-wide sync behind a posted NCCL op
that waits for the peer), and the stacks show where.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterable

log = logging.getLogger("glmserve.shared.kvcache.link")

MAX_LISTED = 8  # unfinished transfers named in one teardown line
STACK_REASONS = ("timed out", "peer tore")  # reasons worth a stack dump (not "closed")


def describe_pending(xfers: Iterable, now: float | None = None) -> str:
    """"send 'q0/0' 226.5 MB posted 30.0 s ago, ..." for the unfinished transfers (oldest first)."""
    now = time.monotonic() if now is None else now
    items = list(xfers)
    parts = [f"{x.kind} {x.xfer_id!r} {x.nbytes / 1e6:.1f} MB posted {now - x.posted:.1f} s ago"
             for x in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        parts.append(f"... {len(items) - MAX_LISTED} more")
    return ", ".join(parts) if parts else "none"


def thread_stacks() -> str:
    """The Python stack of every thread of this process (innermost frame last)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, '?')} ({ident})\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def log_teardown(name: str, reason: str, stuck: list, stats, abort_error: str = "") -> None:
    """One WARNING per teardown (plus the thread stacks for a deadline or a peer's notice)."""
    if reason == "closed" and not stuck:
        log.info("KV link %s closed", name)
        return
    log.warning("KV link %s torn down: %s; unfinished: %s; link totals: %d sent (%d B), %d received (%d B)%s",
                name, reason, describe_pending(stuck), stats.num_sent, stats.bytes_sent, stats.num_recv,
                stats.bytes_recv, f"; {abort_error}" if abort_error else "")
    if any(r in reason for r in STACK_REASONS):
        log.warning("KV link %s: thread stacks at teardown:\n%s", name, thread_stacks())
