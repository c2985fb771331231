"""Fixture: the timed OpenAI-compatible server (tests/bench/timed_server.py) in its own process."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from glmserve.shared.ports import free_port


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


@pytest.fixture(scope="module")
def cpu_fleet(tmp_path_factory):
    """The CPU demo fleet via `python -m glmserve.deploy up --detach`: (base_url, [metrics urls]); `deploy down` after."""
    import importlib.util

    if any(importlib.util.find_spec(f"glmserve.{m}.__main__") is None for m in ("router", "prefill_worker", "decode_worker")):
        pytest.skip("router / worker entry points not landed yet")
    try:
        from tests.deploy.fleet_ports import fleet_ports, seed_state_dir
    except ImportError:  # tests/ is not importable as a package
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "deploy"))
        from fleet_ports import fleet_ports, seed_state_dir

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port, port_base, health_base = fleet_ports()
    state = str(tmp_path_factory.mktemp("fleet") / "state")
    seed_state_dir(state)
    up = subprocess.run([sys.executable, "-m", "glmserve.deploy", "up", "--detach", "--state_dir", state, "--port", str(port),
                         "--port_base", str(port_base), "--health_base", str(health_base), "--ready_timeout", "240"],
                        cwd=repo, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        metrics = [f"http://127.0.0.1:{p}/metrics" for p in (port, health_base + 1, health_base + 11)]
        yield f"http://127.0.0.1:{port}", metrics
    finally:
        subprocess.run([sys.executable, "-m", "glmserve.deploy", "down", "--state_dir", state], cwd=repo, timeout=120)
