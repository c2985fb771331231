"""Builds a router process wired to a scripted ProtocolPeer (see protocol_peer.py)."""

from __future__ import annotations

import contextlib
import time

import httpx

from conftest import RouterProc, free_port
from protocol_peer import PeerWorker, ProtocolPeer


@contextlib.contextmanager
def peer_fleet(reply: str, prefills: int = 1, decodes: int = 1, busy=(), fail=(), free_pages=None,
               token_delay_s: float = 0.0, router_args=()):
    from shared.tokenizer.glm_tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    workers = [PeerWorker(f"p{i}", "prefill", f"tcp://127.0.0.1:{free_port()}", fail_retryable=f"p{i}" in fail)
               for i in range(prefills)]
    workers += [PeerWorker(f"d{i}", "decode", f"tcp://127.0.0.1:{free_port()}", busy=f"d{i}" in busy,
                           free_pages=(free_pages or {}).get(f"d{i}", 100)) for i in range(decodes)]
    args = []
    for w in workers:
        args += [f"--{w.role}", f"{w.worker_id}={w.addr}"]
    router = RouterProc([*args, "--max_req_total_len", "2048", *router_args])
    peer = ProtocolPeer(router.events_addr, workers, tok.encode(reply), token_delay_s).start()
    try:
        deadline = time.monotonic() + 10
        while httpx.get(router.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "router never became ready"
            time.sleep(0.05)
        yield router, peer, tok
    finally:
        peer.stop()
        router.stop()
