"""`python -m glmserve.deploy up` on the CPU demo (real supervisord, router and workers): ready, one completion, down."""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

try:
    from tests.deploy.fleet_ports import fleet_ports, seed_state_dir
except ImportError:  # tests/ is not importable as a package (plain `pytest` without tests/__init__.py)
    from fleet_ports import fleet_ports, seed_state_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_fleet = pytest.mark.skipif(
    any(importlib.util.find_spec(f"glmserve.{m}.__main__") is None for m in ("router", "prefill_worker", "decode_worker")),
    reason="router / worker entry points not landed yet")


def test_down_without_fleet(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glmserve.deploy", "down", "--state_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no running fleet" in proc.stdout


def _wait_line(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"no {needle!r} from deploy up:\n" + "".join(seen))


def _ctl(state: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", os.path.join(state, "supervisord.conf"),
                           *args], capture_output=True, text=True, timeout=30).stdout.strip()


def _kill_and_see_restart(state: str, program: str, port: int) -> None:
    """SIGKILL a worker: supervisord starts a new one and the router's /readyz is 200 again."""
    import signal

    import httpx

    pid = int(_ctl(state, "pid", program))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = _ctl(state, "pid", program)
        if new.isdigit() and int(new) not in (0, pid) and "RUNNING" in _ctl(state, "status", program):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{program} was not restarted")
    time.sleep(3.5)  # the router marks a worker silent for 3 s unready; wait until it has seen the new one
    while time.monotonic() < deadline:
        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError("router not ready after the restart")


@pytest.mark.slow
@needs_fleet
def test_deploy_up_cpu_demo(tmp_path):
    from openai import OpenAI

    port, port_base, health_base = fleet_ports()
    state = str(tmp_path / "state")
    seed_state_dir(state)  # the embedded model, written once per session (its creation: test_default_model.py)
    cmd = [sys.executable, "-m", "glmserve.deploy", "up", "--state_dir", state, "--port", str(port),
           "--port_base", str(port_base), "--health_base", str(health_base), "--ready_timeout", "240"]
    up = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _wait_line(up, "choices[0].message.content", 300)  # the last line of the ready hint
        assert "curl http://127.0.0.1:%d/v1/chat/completions" % port in out and "from openai import OpenAI" in out
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
        assert os.path.exists(os.path.join(state, "default_model", "config.json"))
        st = subprocess.run([sys.executable, "-m", "glmserve.deploy", "status", "--state_dir", state], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and st.stdout.count("RUNNING") == 3, st.stdout
        _kill_and_see_restart(state, "decode_d0", port)
        r = client.completions.create(model=model, prompt="Hello again", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        down = subprocess.run([sys.executable, "-m", "glmserve.deploy", "down", "--state_dir", state],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        rc = up.wait(60)
    assert down.returncode == 0 and "fleet stopped" in down.stdout
    assert rc == 0
    assert not os.path.exists(os.path.join(state, "supervisor.sock"))


def test_up_refuses_a_port_in_use(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "glmserve.deploy", "up", "--state_dir", str(tmp_path), "--port", str(port),
                               "--model_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "already in use" in proc.stderr
    assert not os.path.exists(tmp_path / "supervisord.pid")


def test_up_fails_fast_when_programs_keep_dying(tmp_path):
    """A model dir that does not exist: every program dies at start, up reports FATAL and stops supervisord."""
    port, port_base, health_base = fleet_ports()
    state = str(tmp_path / "state")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "glmserve.deploy", "up", "--state_dir", state, "--model_dir",
                           str(tmp_path / "missing"), "--port", str(port), "--port_base", str(port_base),
                           "--health_base", str(health_base), "--start_retries", "0", "--ready_timeout", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 1 and "kept dying at start" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60  # not the 120 s ready timeout
    assert "---- router.log" in proc.stderr  # the logs' tails are shown
    pid = open(os.path.join(state, "supervisord.pid")).read().strip() if os.path.exists(
        os.path.join(state, "supervisord.pid")) else ""
    assert not pid or subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0
