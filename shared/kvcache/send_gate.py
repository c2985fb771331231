"""The send gate of one KV link end: a send reaches the backend only once the peer committed the
matching recv (see shared/kvcache/README.md, "The send gate").

Why: an NCCL send kernel spins on the GPU until the peer's recv runs; a sender whose thread then
blocks on a device-wide sync before the peer posts that recv waits on itself. Counting: this end
adds 1 to `{prefix}/recvs/{role}` (PeerSignal) for every recv BEFORE the backend call (NCCL's
first p2p call connects both ends inside the call); its k-th send may go once the peer's count
is >= k. On by default for CUDA, off for gloo; KVLINK_SEND_GATE=0/1 overrides.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from glmserve.shared.kvcache.peer_signal import PeerSignal


def gate_enabled(cuda: bool, signal: PeerSignal | None, override: bool | None = None) -> bool:
    env = os.environ.get("KVLINK_SEND_GATE", "")
    on = (env == "1" if env else cuda) if override is None else override
    return on and signal is not None


class SendGate:
    def __init__(self, signal: PeerSignal):
        self.signal = signal
        self.num_sends = 0  # sends posted by this end so far

    def next_send(self) -> int:
        """The 1-based number of a newly posted send: the peer's recv count it waits for."""
        self.num_sends += 1
        return self.num_sends

    def commit_recv(self) -> None:
        """Count a recv this end is about to hand to the backend (opens the peer's matching send)."""
        self.signal.commit_recv()

    def wait_open(self, seq: int, broken: Callable[[], bool], while_slow: Callable[[float], bool]) -> bool:
        """Poll until the peer committed `seq` recvs: True; False once `broken()` or, asked every
        0.25 s after the first 0.5 s, `while_slow(waited_s)` (fires deadlines, peer teardown)."""
        t0 = time.monotonic()
        next_slow = t0 + 0.5
        while self.signal.peer_recvs() < seq:
            now = time.monotonic()
            if broken() or (now >= next_slow and while_slow(now - t0)):
                return False
            next_slow = next_slow if now < next_slow else now + 0.25
            time.sleep(min(2e-3, max(5e-5, 0.05 * (now - t0))))
        return True
