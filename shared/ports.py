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


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, outside the ephemeral range when the range allows."""
    hi = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(_LOW, hi) if hi - _LOW > 1000 else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port found")
