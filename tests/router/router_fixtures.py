"""Router test helpers: a real `python -m glmserve.router` process (RouterProc) and one wired to a
scripted ProtocolPeer (peer_fleet, see protocol_peer.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx

from protocol_peer import PeerWorker, ProtocolPeer

from glmserve.shared.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RouterProc:
    def __init__(self, args: list[str]):
        self.port = free_port()
        self.events_addr = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "glmserve.router", "--port", str(self.port), "--events_addr", self.events_addr,
               "--log_level", "warning", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        self._wait()

    def _wait(self, timeout_s: float = 30.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("router did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def absent_workers() -> list[str]:
    return ["--prefill", f"p0=tcp://127.0.0.1:{free_port()}", "--decode", f"d0=tcp://127.0.0.1:{free_port()}"]


@contextlib.contextmanager
def peer_fleet(reply: str, prefills: int = 1, decodes: int = 1, busy=(), fail=(), free_pages=None,
               token_delay_s: float = 0.0, router_args=()):
    from glmserve.shared.tokenizer.glm_tokenizer import load_tokenizer

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
