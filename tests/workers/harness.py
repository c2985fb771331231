"""Drive real prefill + decode worker processes over ZeroMQ the way the router does (tests only).

`WorkerPair` starts `python -m glmserve.decode_worker` and `python -m glmserve.prefill_worker` on free ports,
binds the events PULL socket itself and plays the router: Reserve -> Reserved -> PrefillRequest,
then collects TokenEvents. Heartbeats (WorkerStatus) are kept per worker for page checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

from glmserve.shared import protocol as P
from glmserve.shared.worker_common.tp import free_port


class WorkerPair:
    def __init__(self, model_dir: str, log_dir: str, page_size: int = 4, num_pages: int = 128,
                 chunked_prefill_size: int = 16, extra_decode: tuple[str, ...] = (), tp: int = 1,
                 device: str = "cpu", gpus: dict[str, str] | None = None, dtype: str = "float32",
                 load_format: str = "auto", extra: tuple[str, ...] = (), extra_prefill: tuple[str, ...] = ()):
        self.ctx = zmq.Context.instance()
        self.events = self.ctx.socket(zmq.PULL)
        port = self.events.bind_to_random_port("tcp://127.0.0.1")
        events_addr = f"tcp://127.0.0.1:{port}"
        self.addrs = {"d0": f"tcp://127.0.0.1:{free_port()}", "p0": f"tcp://127.0.0.1:{free_port()}"}
        self.health = {"d0": free_port(), "p0": free_port()}
        common = ["--model_dir", model_dir, "--router_addr", events_addr, "--device", device, "--tp", str(tp),
                  "--dtype", dtype, "--page_size", str(page_size), "--num_pages", str(num_pages),
                  "--load-format", load_format, *extra]
        gpus = gpus or {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.logs = {w: os.path.join(log_dir, f"{w}.log") for w in self.addrs}
        self.cmds = {
            "d0": [sys.executable, "-m", "glmserve.decode_worker", "--worker_id", "d0", "--control_addr", self.addrs["d0"],
                   "--link_port", str(free_port()), "--health-port", str(self.health["d0"]), *common, *extra_decode,
                   *(["--gpus", gpus["d0"]] if "d0" in gpus else [])],
            "p0": [sys.executable, "-m", "glmserve.prefill_worker", "--worker_id", "p0", "--control_addr", self.addrs["p0"],
                   "--decode", f"d0={self.addrs['d0']}", "--health_port", str(self.health["p0"]),
                   "--chunked_prefill_size", str(chunked_prefill_size), *common, *extra_prefill,
                   *(["--gpus", gpus["p0"]] if "p0" in gpus else [])],
        }
        self.env = env
        self.procs = {w: self._start(w) for w in self.cmds}
        self.push = {w: self._push(a) for w, a in self.addrs.items()}
        self.status: dict[str, P.WorkerStatus] = {}
        self.inbox: list[P.Msg] = []
        self.batched_frames: list[tuple[str, int]] = []  # (worker, events) of every TokenEvents frame

    def _start(self, worker: str, mode: str = "w") -> subprocess.Popen:
        return subprocess.Popen(self.cmds[worker], stdout=open(self.logs[worker], mode), stderr=subprocess.STDOUT,
                                env=self.env)

    def kill_and_restart(self, worker: str) -> None:
        """kill -9 a worker (what a crash looks like), then start it again as supervisord would."""
        self.procs[worker].kill()
        self.procs[worker].wait()
        self.status.pop(worker, None)
        self.procs[worker] = self._start(worker, mode="a")

    def _push(self, addr: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        return s

    def send(self, worker: str, msg: P.Msg) -> None:
        self.push[worker].send(P.encode(msg))

    def pump(self, timeout_s: float = 0.05) -> None:
        """Read events for up to timeout_s; heartbeats go to `status`, the rest to `inbox`."""
        if self.events.poll(int(timeout_s * 1000)):
            while True:
                try:
                    msg = P.decode(self.events.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, P.WorkerStatus):
                    self.status[msg.worker_id] = msg
                else:
                    if isinstance(msg, P.TokenEvents):
                        self.batched_frames.append((msg.events[0].worker_id, len(msg.events)))
                    self.inbox.extend(P.unbatch(msg))
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited {p.returncode}:\n" + open(self.logs[name]).read()[-3000:])

    def wait(self, cond, timeout_s: float, what: str):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.pump()
            got = cond()
            if got:
                return got
        tails = "\n".join(f"--- {n}\n" + open(f).read()[-2000:] for n, f in self.logs.items())
        raise TimeoutError(f"{what} not within {timeout_s}s\n{tails}")

    def wait_ready(self, timeout_s: float = 60) -> None:
        self.wait(lambda: all(self.status.get(w) and self.status[w].ready for w in self.addrs), timeout_s, "ready")

    def take(self, pred) -> list[P.Msg]:
        got = [m for m in self.inbox if pred(m)]
        self.inbox = [m for m in self.inbox if not pred(m)]
        return got

    def used_pages(self) -> dict[str, int]:
        return {w: s.used_pages for w, s in self.status.items()}

    def stop(self) -> None:
        from tests.e2e.fleet import stop_procs

        stop_procs(self.procs.values())
        for s in [self.events, *self.push.values()]:
            s.close(linger=0)
