"""The router's HTTP protocol bounds a request head at 64 KiB (router/http_protocol.py), never a body.

Real router process, raw sockets: the bound is about bytes on the wire, so the test writes them."""

from __future__ import annotations

import json
import socket
import time

import pytest
from router_fixtures import RouterProc, absent_workers

from glmserve.router.http_protocol import MAX_HEAD_BYTES


@pytest.fixture(scope="module")
def router():
    r = RouterProc([*absent_workers(), "--max_body_bytes", str(4 * 2**20)])
    yield r
    r.stop()


def _exchange(url: str, parts: list[bytes], pause_s: float = 0.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            for p in parts:
                s.sendall(p)
                if pause_s:
                    time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the router closed the connection while the head was still coming
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                return out
            if not got:
                return out
            out += got
            if b"\r\n\r\n" in out and (b"connection: close" in out.lower() or out.endswith(b"}")):
                return out


def _get(header_value: bytes) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + header_value + b"\r\n\r\n"


def test_oversized_head_is_refused_and_the_router_serves_on(router):
    big = _exchange(router.url, [_get(b"a" * (4 * MAX_HEAD_BYTES))])
    assert big.startswith(b"HTTP/1.1 400") and b"Request head too large." in big
    # the same in 1 KiB pieces: counted across reads
    req = _get(b"b" * (2 * MAX_HEAD_BYTES))
    slow = _exchange(router.url, [req[i:i + 1024] for i in range(0, len(req), 1024)], pause_s=0.001)
    assert slow.startswith(b"HTTP/1.1 400") and b"Request head too large." in slow
    ok = _exchange(router.url, [_get(b"c" * (MAX_HEAD_BYTES // 2))])
    assert ok.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("body_kib,rounds", [(1024, 2), (96, 20)])
def test_large_bodies_are_not_counted_as_head(router, body_kib, rounds):
    """A body over the head bound in one write, several times on one keep-alive connection: every
    request reaches the app (its own answer: the prompt is too long for the router's limit), not the
    head bound. 96 KiB requests often arrive whole in one read (head, body and the message's end)."""
    body = json.dumps({"model": "m", "prompt": "a " * (body_kib * 512), "max_tokens": 1}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        for _ in range(rounds):
            s.sendall(head + body)
            out = b""
            while b"\r\n\r\n" not in out:
                out += s.recv(65536)
            status = out.split(b"\r\n", 1)[0]
            hdrs, _, rest = out.partition(b"\r\n\r\n")
            length = int([ln for ln in hdrs.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(rest) < length:
                rest += s.recv(65536)
            assert status.startswith(b"HTTP/1.1 4") and b"Request head too large" not in rest, out[:300]
            assert json.loads(rest)["error"]["message"]
