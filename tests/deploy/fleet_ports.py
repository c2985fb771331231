"""Free port blocks for a test fleet (router port, port_base .. +21, health_base .. +11) on 127.0.0.1."""

import random
import socket


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def fleet_ports() -> tuple[int, int, int]:
    """(router port, port_base, health_base), every port of the blocks free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000, 100)
        port, port_base, health_base = base, base + 10, base + 50
        ports = [port] + list(range(port_base, port_base + 22)) + list(range(health_base, health_base + 12))
        if all(_free(p) for p in ports):
            return port, port_base, health_base
    raise RuntimeError("no free port block")
