"""`deploy up` / `deploy down`: run supervisord in the foreground, wait for the router's /readyz (deploy CLI process).

up: render `<state_dir>/supervisord.conf`, start `supervisord -n`, poll http://HOST:PORT/readyz until
200 and print how to call the fleet; then wait (or, with --detach, return and leave it running). SIGINT / SIGTERM stop supervisord, which stops every
program (and its process group) in reverse priority. down: `supervisorctl shutdown` over the state
dir's socket, falling back to SIGTERM to the pid in the pidfile; returns once supervisord is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from glmserve.deploy.plan import FleetSpec, fleet_key_path
from glmserve.deploy.render import write_config
from glmserve.shared.fleet_key import write_fleet_key

READY_HINT = """
glmserve is ready: http://{host}:{port}  (logs: {log_dir}, stop: python -m glmserve.deploy down{state_flag})

  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="http://{host}:{port}/v1", api_key="none"); \\
print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=32).choices[0].message.content)'
"""


def conf_path(state_dir: str) -> str:
    return os.path.join(state_dir, "supervisord.conf")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _model_name(host: str, port: int) -> str:
    try:
        return httpx.get(f"http://{host}:{port}/v1/models", timeout=5).json()["data"][0]["id"]
    except Exception:  # noqa: BLE001 - the hint still works with any name on our router
        return "default"


def _tail_logs(log_dir: str, lines: int = 15) -> None:
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            tail = f.readlines()[-lines:]
        print(f"---- {name} (last {len(tail)} lines)\n" + "".join(tail), file=sys.stderr)


MAX_START_PIDS = 4  # a program seen with this many pids while the fleet comes up is crash-looping


def _dying(state_dir: str, pids: dict[str, set[str]]) -> list[str]:
    """Programs that keep dying: FATAL (died within startsecs too often) or seen with MAX_START_PIDS pids
    (died later than startsecs, so supervisord restarts them forever). `pids` accumulates across calls."""
    out = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf_path(state_dir), "status"],
                         capture_output=True, text=True).stdout
    dying = []
    for line in out.splitlines():
        words = line.replace(",", " ").split()
        if len(words) < 2:
            continue
        if "pid" in words:
            pids.setdefault(words[0], set()).add(words[words.index("pid") + 1])
        if words[1] == "FATAL" or len(pids.get(words[0], ())) >= MAX_START_PIDS:
            dying.append(words[0])
    return dying


def _wait_ready(proc: subprocess.Popen, spec: FleetSpec, timeout_s: float) -> bool:
    url = f"http://{spec.host}:{spec.port}/readyz"
    deadline = time.monotonic() + timeout_s
    pids: dict[str, set[str]] = {}
    checks = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _ready(url):
            return True
        checks += 1
        if checks % 2 == 0 and (dying := _dying(spec.state_dir, pids)):  # every ~1-2 s
            print(f"deploy: {', '.join(dying)} kept dying at start (FATAL or restarted "
                  f"{MAX_START_PIDS - 1}+ times); see the logs below", file=sys.stderr)
            return False
        time.sleep(0.5)
    print(f"deploy: the router's /readyz did not answer 200 within {timeout_s:.0f} s", file=sys.stderr)
    return False


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def up(spec: FleetSpec, ready_timeout_s: float, default_state: bool, detach: bool = False) -> int:
    """Run the fleet; with `detach`, return once ready and leave supervisord running (stop: `down`)."""
    pid = _pid(spec.state_dir)
    if pid is not None and _alive(pid):
        print(f"deploy: a fleet is already running under {spec.state_dir} (supervisord {pid}); "
              f"python -m glmserve.deploy down --state_dir {spec.state_dir}", file=sys.stderr)
        return 1
    if _port_taken(spec.host, spec.port):
        print(f"deploy: {spec.host}:{spec.port} is already in use (a fleet already up? python -m glmserve.deploy down)",
              file=sys.stderr)
        return 1
    conf = write_config(spec, conf_path(spec.state_dir))
    write_fleet_key(fleet_key_path(spec.state_dir))  # a new secret per fleet; the programs read its path
    log_dir = os.path.join(spec.state_dir, "logs")
    print(f"deploy: config {conf}; starting supervisord (router on {spec.host}:{spec.port}) ...", flush=True)
    out = open(os.path.join(log_dir, "supervisord.out"), "ab") if detach else None
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf],
                            cwd=spec.workdir, start_new_session=True, stdout=out, stderr=out)
    stop = lambda *_: proc.send_signal(signal.SIGTERM)  # noqa: E731 - supervisord stops its programs
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not _wait_ready(proc, spec, ready_timeout_s):
        _tail_logs(log_dir)
        stop()
        proc.wait(60)
        return 1
    state_flag = "" if default_state else f" --state_dir {spec.state_dir}"
    print(READY_HINT.format(host=spec.host, port=spec.port, log_dir=log_dir, state_flag=state_flag,
                            model=_model_name(spec.host, spec.port)), flush=True)
    if detach:
        return 0
    return 0 if proc.wait() in (0, -signal.SIGTERM) else 1


def _pid(state_dir: str) -> int | None:
    try:
        with open(os.path.join(state_dir, "supervisord.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def down(state_dir: str, timeout_s: float = 60.0) -> int:
    pid = _pid(state_dir)
    if pid is None or not _alive(pid):
        print(f"deploy: no running fleet under {state_dir}")
        return 0
    conf = conf_path(state_dir)
    rc = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, "shutdown"],
                        capture_output=True, text=True).returncode
    if rc != 0:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        print(f"deploy: supervisord {pid} still running after {timeout_s:.0f} s", file=sys.stderr)
        return 1
    print("deploy: fleet stopped")
    return 0


def status(state_dir: str) -> int:
    """supervisorctl status of every program; 0 when all are RUNNING, 3 when no fleet runs."""
    pid = _pid(state_dir)
    if pid is None or not _alive(pid):
        print(f"deploy: no running fleet under {state_dir}")
        return 3
    proc = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf_path(state_dir), "status"],
                          capture_output=True, text=True)
    print(proc.stdout.rstrip())
    return proc.returncode
