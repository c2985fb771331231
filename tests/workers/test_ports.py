"""shared.ports.free_port: outside the ephemeral range (no race with outgoing connections' ports)."""

import socket

from glmserve.shared import ports as ports_mod
from glmserve.shared.ports import _ephemeral_low, free_port


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free: a server can take it


def test_free_port_never_hands_out_the_same_port_twice(monkeypatch):
    """Ports picked before any is bound (a worker pair's control, health and link ports) must differ,
    even when the random draw repeats: a drawn port already handed out is skipped."""
    draws = iter([23456, 23456, 23457])
    monkeypatch.setattr(ports_mod.random, "randrange", lambda lo, hi: next(draws))
    monkeypatch.setattr(ports_mod, "_HANDED", set())
    assert free_port() == 23456 and free_port() == 23457
