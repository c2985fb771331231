"""Start a real fleet (router + prefill + decode workers as subprocesses) for end-to-end tests.

Used by tests/e2e (workers), tests/router and tests/bench. Every process gets free ports; the
fleet is ready when the router's /readyz answers 200. Worker health ports are exposed so tests
can read /metrics (e.g. glm_worker_kv_pages_used) and check that pages return to zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from glmserve.shared.ports import free_port


@dataclass
class Fleet:
    base_url: str  # http://127.0.0.1:PORT of the router
    model_dir: str
    health_ports: dict[str, int]  # worker id -> health port
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # name -> log file path
    cmds: dict[str, list[str]] = field(default_factory=dict)  # name -> `python -m` args (for restart)

    def metric(self, worker_id: str, name: str) -> float:
        """Value of one unlabelled-by-extra-labels glm_worker_* sample of a worker."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.health_ports[worker_id]}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def restart(self, name: str) -> None:
        """Start `name` again with its original command line (after a kill); its log is appended to."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        _spawn(name, self.cmds[name], os.path.dirname(self.logs[name]), self, mode="a")

    def stop(self) -> None:
        stop_procs(self.procs.values())


def stop_procs(procs) -> None:
    """SIGTERM every process still running, then wait up to 10 s each; SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def _spawn(name: str, args: list[str], log_dir: str, fleet: Fleet, mode: str = "w") -> None:
    path = os.path.join(log_dir, f"{name}.log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    fleet.procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=open(path, mode),
                                         stderr=subprocess.STDOUT, env=env)
    fleet.logs[name] = path
    fleet.cmds[name] = list(args)


def start_fleet(model_dir: str, log_dir: str, num_prefill: int = 1, num_decode: int = 1, page_size: int = 4,
                num_pages: int = 256, chunked_prefill_size: int = 32, router_args: tuple[str, ...] = (),
                timeout_s: float = 120.0, worker_args: tuple[str, ...] = (), wait: bool = True) -> Fleet:
    """worker_args go to every prefill and decode worker (e.g. ("--mtp_step", "2")).
    wait=False returns as soon as the processes are spawned (tests that watch the fleet come up)."""
    events = f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    fleet = Fleet(f"http://127.0.0.1:{port}", model_dir, {})
    common = ["--model_dir", model_dir, "--router_addr", events, "--device", "cpu", "--tp", "1",
              "--dtype", "float32", "--page_size", str(page_size), "--num_pages", str(num_pages), *worker_args]
    decodes = {f"d{i}": f"tcp://127.0.0.1:{free_port()}" for i in range(num_decode)}
    prefills = {f"p{i}": f"tcp://127.0.0.1:{free_port()}" for i in range(num_prefill)}
    for wid, addr in decodes.items():
        fleet.health_ports[wid] = free_port()
        _spawn(wid, ["glmserve.decode_worker", "--worker_id", wid, "--control_addr", addr, "--link_port", str(free_port()),
                     "--health_port", str(fleet.health_ports[wid]), *common], log_dir, fleet)
    peers = [a for wid, addr in decodes.items() for a in ("--decode", f"{wid}={addr}")]
    for wid, addr in prefills.items():
        fleet.health_ports[wid] = free_port()
        _spawn(wid, ["glmserve.prefill_worker", "--worker_id", wid, "--control_addr", addr, "--health_port",
                     str(fleet.health_ports[wid]), "--chunked_prefill_size", str(chunked_prefill_size),
                     *peers, *common], log_dir, fleet)
    _spawn("router", ["glmserve.router", "--host", "127.0.0.1", "--port", str(port), "--model_dir", model_dir,
                      "--events_addr", events,
                      *[a for wid, addr in prefills.items() for a in ("--prefill", f"{wid}={addr}")],
                      *[a for wid, addr in decodes.items() for a in ("--decode", f"{wid}={addr}")],
                      *router_args], log_dir, fleet)
    if wait:
        _wait_ready(fleet, timeout_s)
    return fleet


def _wait_ready(fleet: Fleet, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in fleet.procs.items():
            if p.poll() is not None:
                fleet.stop()
                raise RuntimeError(f"{name} exited ({p.returncode}):\n" + open(fleet.logs[name]).read()[-4000:])
        try:
            if urllib.request.urlopen(fleet.base_url + "/readyz", timeout=2).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    tails = "\n".join(f"--- {n}\n" + open(f).read()[-2000:] for n, f in fleet.logs.items())
    fleet.stop()
    raise TimeoutError(f"fleet not ready in {timeout_s}s\n{tails}")
