"""Teardown notice between the two ends of one KV link (prefill and decode worker ranks).

NCCL cannot cancel a posted send/recv: the op of the end that did NOT tear down stays blocked on
the GPU until that end aborts its communicator too (NCCL wants every rank of a communicator to
abort). So an end that tears down writes `{prefix}/down/{role}` (the reason) into the link's
TCPStore, and an end whose transfer has been pending for a while looks for the peer's key
(`PGLink`'s completion thread, every 0.25 s after 0.5 s of waiting) and tears down at once instead
of waiting for its own deadline.

The same store carries the send gate (see `PGLink`): each end counts the recvs it posted under
`{prefix}/recvs/{role}`; a gated send is handed to NCCL only once the peer's count covers it.

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
        self.my_recvs = f"{prefix}/recvs/{role}"  # counter: recvs this end committed to post
        self.their_recvs = f"{prefix}/recvs/{peer_role}"

    def commit_recv(self) -> None:
        """Count one more recv posted by this end (the peer's gated send waits for it)."""
        with contextlib.suppress(Exception):  # store gone: the peer's gate waits, its deadline fires
            self.store.add(self.my_recvs, 1)

    def peer_recvs(self) -> int:
        """How many recvs the peer has posted so far (-1 when the store cannot be reached)."""
        try:
            return int(self.store.add(self.their_recvs, 0))
        except Exception:  # noqa: BLE001 - unreachable store: keep waiting, the deadline decides
            return -1

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
