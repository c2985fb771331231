"""Teardown notice between the two ends of one KV link (prefill and decode worker ranks).

NCCL cannot cancel a posted send/recv: the op of the end that did NOT tear down stays blocked on
the GPU until that end aborts its communicator too (NCCL wants every rank of a communicator to
abort). So an end that tears down writes `{prefix}/down/{role}` (the reason) into the link's
TCPStore, and an end whose transfer has been pending for a while looks for the peer's key
(`PGLink`'s completion thread, every 0.25 s after 0.5 s of waiting) and tears down at once instead
of waiting for its own deadline.

Each PeerSignal opens its own store client (when it can): a store call of another thread (a
rendezvous `wait` of up to the connect timeout) must not delay the notice.
"""

from __future__ import annotations

import contextlib
import datetime

import torch.distributed as dist

STORE_TIMEOUT_S = 5.0


class PeerSignal:
    def __init__(self, store: dist.Store, prefix: str, role: str, peer_role: str):
        self.store = _own_client(store)
        self.mine = f"{prefix}/down/{role}"
        self.theirs = f"{prefix}/down/{peer_role}"

    def mark_down(self, reason: str) -> None:
        with contextlib.suppress(Exception):  # best effort: the store host may be gone too
            self.store.set(self.mine, reason[:500])

    def peer_down(self) -> str | None:
        """The peer's teardown reason, or None while it did not tear down (or the store is gone)."""
        try:
            if self.store.check([self.theirs]):
                return self.store.get(self.theirs).decode(errors="replace")
        except Exception:  # noqa: BLE001 - an unreachable store is not a teardown notice
            return None
        return None


def _own_client(store: dist.Store) -> dist.Store:
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if not host or not port:
        return store
    try:
        return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=STORE_TIMEOUT_S),
                             wait_for_workers=False)
    except Exception:  # noqa: BLE001 - fall back to the shared client
        return store
