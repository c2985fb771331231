"""Fixtures of the router tests: a real `python -m router` process on a real socket.

`router_proc(extra_args)` starts one with free ports and waits for /healthz. The default
`router_url` router names one prefill and one decode worker that do not exist (generation
answers 503), which is what validation tests want: they must fail before dispatch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterProc:
    def __init__(self, args: list[str]):
        self.port = free_port()
        self.events_addr = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "router", "--port", str(self.port), "--events_addr", self.events_addr,
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


@pytest.fixture(scope="session")
def router_url():
    r = RouterProc([*absent_workers(), "--max_req_total_len", "256", "--max_body_bytes", "65536"])
    yield r.url
    r.stop()


@pytest.fixture
def fleet():
    """fleet(**kw) -> (router, peer, tokenizer): a router wired to a scripted protocol peer."""
    import contextlib

    from router_fixtures import peer_fleet

    with contextlib.ExitStack() as stack:
        def make(reply: str = "Hello world. STOP here, then more text follows.", **kw):
            return stack.enter_context(peer_fleet(reply, **kw))

        yield make
