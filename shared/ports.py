"""Free TCP ports for processes started later (tests, `deploy`, TP stores, benches).

A port found by binding port 0 comes from the kernel's ephemeral range, the range outgoing
connections take their local ports from: between the check and the real server's bind, any new
connection on the host (ZeroMQ, TCPStore clients, HTTP) may take it (EADDRINUSE, seen in CI).
So pick at random below that range and check that nothing listens there now.
"""

from __future__ import annotations

import random
import socket

_LOW = 10000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_HANDED: set[int] = set()  # ports this process has handed out: never twice (callers bind them later)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, outside the ephemeral range when the range allows, and not one
    this process handed out before: several picked before any is bound (a worker pair's five) must
    differ (a CI run failed with a prefill's control port already in use)."""
    hi = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(_LOW, hi) if hi - _LOW > 1000 else 0
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _HANDED:
            _HANDED.add(port)
            return port
    raise RuntimeError("no free TCP port found")


_LISTENERS: list[socket.socket] = []  # kept open for the life of the stores that serve on them


def hosted_store(host: str, port: int, timeout_s: float, world_size: int | None = None,
                 wait_for_workers: bool = False):
    """A torch TCPStore server listening on `host` only (TCPStore itself binds every interface).

    The socket is bound here and handed over as master_listen_fd; torch is imported lazily so the
    router, which never builds a store, never imports it."""
    from datetime import timedelta

    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    _LISTENERS.append(sock)
    return dist.TCPStore(host, port, world_size, True, timedelta(seconds=timeout_s),
                         wait_for_workers=wait_for_workers, master_listen_fd=sock.fileno())
