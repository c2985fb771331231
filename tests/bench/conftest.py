"""Fixture: the timed OpenAI-compatible server (tests/bench/timed_server.py) in its own process."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def timed_server():
    port = free_port()
    script = os.path.join(os.path.dirname(__file__), "timed_server.py")
    proc = subprocess.Popen([sys.executable, script, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("timed server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
