"""shared.ports.free_port: outside the ephemeral range (no race with outgoing connections' ports)."""

import socket

from glmserve.shared.ports import _ephemeral_low, free_port


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free: a server can take it
