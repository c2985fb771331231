"""Hostile input against a real CPU fleet (router + prefill + decode processes, ZeroMQ, gloo link):

- forged ZeroMQ messages (unsigned, signed with another key, or signed but out of bounds) to every
  socket a process binds are dropped: no worker dies, the KV link is not rebuilt, no token reaches a
  client, and the fleet's greedy output is the same before and after;
- the KV-link and TP TCPStores listen on the configured host only (not every interface);
- HTTP: JSON nested 1000+ levels is a 400 (not a 500); a 3.5 MB text prompt is tokenized off the
  event loop (other requests keep answering); a body that trickles in gets a 408 after --body_timeout_s.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time

import httpx
import msgspec
import pytest
import zmq

from glmserve.shared import protocol as P

try:
    from e2e.conftest import _write_model
    from e2e.fleet import start_fleet
except ImportError:
    from tests.e2e.conftest import _write_model
    from tests.e2e.fleet import start_fleet

pytestmark = pytest.mark.slow
BODY_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model_dir = _write_model(str(tmp_path_factory.mktemp("hard_model")), "glm4_moe_lite")
    f = start_fleet(model_dir, str(tmp_path_factory.mktemp("hard_logs")),
                    router_args=("--body_timeout_s", str(BODY_TIMEOUT_S), "--max_req_total_len", "512"))
    yield f
    f.stop()


def _arg(fleet, name: str, flag: str) -> str:
    args = fleet.cmds[name]
    return args[args.index(flag) + 1]


def _greedy(fleet) -> list[int]:
    r = httpx.post(fleet.base_url + "/v1/completions", timeout=60, json={
        "prompt": [11, 12, 13, 14, 15], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _frames(key: bytes | None, msg_body: bytes) -> bytes:
    tag = hmac.new(key, msg_body, hashlib.sha256).digest() if key else b"\0" * P.TAG_BYTES
    return tag + msg_body


def _forged(fleet) -> list[tuple[str, bytes]]:
    """(address, frame) pairs: each message of the issue, unsigned / wrongly signed / out of bounds."""
    enc = msgspec.msgpack.Encoder()
    other_key = os.urandom(32)
    real_key = bytes.fromhex(os.environ["GLMSERVE_FLEET_KEY"])
    p0, d0 = _arg(fleet, "p0", "--control_addr"), _arg(fleet, "d0", "--control_addr")
    events = _arg(fleet, "router", "--events_addr")
    ids = P.pack_ids([1, 2, 3])
    huge_k = P.PrefillRequest(rid="evil-1", prompt_ids=ids, sampling=P.SamplingParams(), decode_id="d0",
                              decode_page_ids=P.pack_ids([0]))
    body = enc.encode(huge_k).replace(enc.encode(-1), enc.encode(2**63))  # top_k = 2**63 (no constructor check)
    out = []
    for key in (None, other_key, real_key):  # the last: signed, but a field is out of bounds
        out.append((p0, _frames(key, body)))
        out.append((d0, _frames(key, body.replace(b"PrefillRequest", b"Reserve\0\0\0\0\0\0\0"))))
    for key in (None, other_key):
        for addr, msg in [
            (d0, P.LinkHello(prefill_id="p0", reply_addr="tcp://127.0.0.1:9", generation=10**9)),
            (d0, P.Abort(rid="x")),
            (d0, P.KVChunkReady(rid="x", prefill_id="p0", page_ids=ids, num_tokens=3)),
            (events, P.WorkerStatus(worker_id="d0", role="decode", ready=False, instance="forged")),
            (events, P.TokenEvent(rid="x", worker_id="d0", token_ids=ids)),
            (events, P.Abort(rid="x")),
        ]:
            out.append((addr, _frames(key, enc.encode(msg))))
    out.append((p0, b"garbage"))
    return out


def _log(fleet, name: str) -> str:
    return open(fleet.logs[name]).read()


def test_forged_messages_are_dropped_and_the_fleet_keeps_serving(fleet):
    before = _greedy(fleet)
    links_before = _log(fleet, "d0").count("KV link to p0 up")
    ctx = zmq.Context.instance()
    socks = {}
    for addr, frame in _forged(fleet):
        if addr not in socks:
            socks[addr] = ctx.socket(zmq.PUSH)
            socks[addr].setsockopt(zmq.LINGER, 1000)
            socks[addr].connect(addr)
        socks[addr].send(frame)
    for s in socks.values():
        s.close()
    # a signed top_k beyond the vocabulary (in the wire's bounds) is one request's error, not a crash
    real = P.encode(P.PrefillRequest(rid="big-k", prompt_ids=P.pack_ids([1, 2]), decode_id="d0",
                                     sampling=P.SamplingParams(top_k=2**31 - 1), decode_page_ids=P.pack_ids([0])))
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(_arg(fleet, "p0", "--control_addr"))
    s.send(real)
    s.close()
    deadline = time.monotonic() + 10
    while _log(fleet, "p0").count("dropped a bad control message") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let the decode, router and prefill handle what is left
    assert all(p.poll() is None for p in fleet.procs.values())
    p0, d0, router = _log(fleet, "p0"), _log(fleet, "d0"), _log(fleet, "router")
    assert p0.count("not signed with this fleet's key") >= 2 and "Expected `int` <= 2147483647" in p0
    assert d0.count("not signed with this fleet's key") >= 8
    assert router.count("not signed with this fleet's key") >= 6
    assert _log(fleet, "d0").count("KV link to p0 up") == links_before  # the forged hello rebuilt nothing
    assert httpx.get(fleet.base_url + "/readyz", timeout=5).status_code == 200  # forged "not ready" ignored
    assert _greedy(fleet) == before


def _listen_addrs(port: int) -> set[str]:
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    out.add(addr)
    return out


def test_link_store_listens_on_the_configured_host_only(fleet):
    port = int(_arg(fleet, "d0", "--link_port"))
    addrs = _listen_addrs(port)
    assert addrs == {"0100007F"}, addrs  # 127.0.0.1, little-endian hex; never 00000000 (every interface)


@pytest.mark.parametrize("depth", [1000, 5000])
def test_deeply_nested_json_is_a_400(fleet, depth):
    for path, body in [("/v1/chat/completions", b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"),
                       ("/v1/completions", b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
                       ("/generate", b'{"inputs": "x", "parameters": {"stop": ' + b"[" * depth + b"]" * depth + b"}}")]:
        r = httpx.post(fleet.base_url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_big_prompt_is_tokenized_off_the_event_loop(fleet):
    text = "lorem ipsum dolor sit amet " * (3_500_000 // 27)  # ~3.5 MB: seconds of tokenization
    result = {}

    def big():
        t0 = time.monotonic()
        r = httpx.post(fleet.base_url + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=120)
        result["status"], result["s"] = r.status_code, time.monotonic() - t0

    th = threading.Thread(target=big)
    th.start()
    time.sleep(0.3)
    gaps = []
    while th.is_alive():
        t0 = time.monotonic()
        assert httpx.get(fleet.base_url + "/healthz", timeout=30).status_code == 200
        gaps.append(time.monotonic() - t0)
        time.sleep(0.05)
    th.join()
    assert result["status"] == 400  # longer than --max_req_total_len: refused after tokenizing
    assert result["s"] > 1.0 and len(gaps) >= 5, result  # the window was long enough to mean something
    assert max(gaps) < 0.75, (max(gaps), result)  # the loop answered throughout


def test_a_trickled_body_times_out_with_408(fleet):
    port = int(fleet.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        t0 = time.monotonic()
        reply = s.recv(4096).decode()
        waited = time.monotonic() - t0
        while "body_timeout" not in reply and (more := s.recv(4096)):  # the body may come in its own segment
            reply += more.decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 5 and "body_timeout" in reply


def test_forged_tokens_never_reach_a_live_stream(fleet):
    """An attacker who learns a live request's id (it is the response id) pushes unsigned and wrongly
    signed TokenEvents for it to the router: the stream carries exactly the greedy tokens, no more."""
    body = {"prompt": [21, 22, 23, 24], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    ref = httpx.post(fleet.base_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(_arg(fleet, "router", "--events_addr"))
    got, forged = [], 0
    with httpx.stream("POST", fleet.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = msgspec.json.decode(line[6:])
            got += chunk["choices"][0].get("token_ids") or []
            if forged < 3:  # while the request runs: its rid is f"{response id}-{choice}.{attempt}"
                rid = f"{chunk['id']}-0.0"
                for key in (None, os.urandom(32)):
                    ev = P.TokenEvent(rid=rid, worker_id="d0", token_ids=P.pack_ids([7, 7, 7]), finished=True,
                                      finish_reason="stop")
                    sock.send(_frames(key, msgspec.msgpack.encode(ev)))
                forged += 1
    sock.close()
    assert forged == 3 and got == ref
