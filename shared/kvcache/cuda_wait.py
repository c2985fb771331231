"""Bounded waits for CUDA work, used by the KV link's completion thread (prefill and decode ranks).

A blocking `Event.synchronize()` cannot be interrupted: if the NCCL op it follows never
completes (peer gone, communicator aborted late), the waiting thread is wedged for good. Instead
we poll `Event.query()` with a sleep that grows with the time already waited: at most 5 % of it
(so a 5 ms transfer is seen done within ~0.25 ms), between 20 us and 0.5 ms, and we give up as soon
as `stop()` says so (the link was torn down). The poller takes the GIL for a few microseconds
per wake-up; the caller's thread keeps running in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

MIN_SLEEP_S = 2e-5
MAX_SLEEP_S = 5e-4
SLOWDOWN = 0.05  # sleep at most this fraction of the time already waited


def wait_event(event: torch.cuda.Event, stop: Callable[[], bool],
               on_slow: Callable[[float], bool] | None = None, max_sleep_s: float = MAX_SLEEP_S) -> bool:
    """Wait until `event` completed: True; False once `stop()` (checked every wake-up) is true or
    `on_slow(waited_s)` returns True (it is asked at most every 0.25 s after the first 0.5 s).
    max_sleep_s caps one sleep (a caller on a step's critical path passes MIN_SLEEP_S)."""
    t0 = time.monotonic()
    next_slow = t0 + 0.5
    while not event.query():
        if stop():
            return False
        now = time.monotonic()
        if on_slow is not None and now >= next_slow:
            if on_slow(now - t0):
                return False
            next_slow = now + 0.25
        time.sleep(min(max_sleep_s, max(MIN_SLEEP_S, SLOWDOWN * (now - t0))))
    return True


def settle(event: torch.cuda.Event | None, limit_s: float) -> bool:
    """Wait up to limit_s for work that is known to finish (a gather or scatter kernel that does
    not depend on the peer); False if it did not (then the caller reports it, never blocks)."""
    if event is None:
        return True
    end = time.monotonic() + limit_s
    return wait_event(event, lambda: time.monotonic() > end)
