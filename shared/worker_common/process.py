"""Process scaffolding shared by `python -m glmserve.prefill_worker` and `python -m glmserve.decode_worker`.

`run_worker` is the whole life of a worker process: followers (tp_rank > 0) join the TP group,
load the model and run plans until told to stop; the leader starts its followers, serves
/healthz at once (and /readyz 503 "loading" until the worker says ready), loads the model,
builds its loop object and runs it until SIGTERM/SIGINT, then shuts down in reverse.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable

from glmserve.shared.fleet_key import FleetKeyError, fleet_key
from glmserve.shared.worker_common.config import WorkerConfig
from glmserve.shared.worker_common.engine import Engine
from glmserve.shared.worker_common.health import HealthServer
from glmserve.shared.worker_common.io import WorkerIO
from glmserve.shared.worker_common.metrics import WorkerMetrics
from glmserve.shared.worker_common.tp import TPFanout, leader_store_port, spawn_followers, strip_tp_flags


class _Readiness:
    """What /readyz reads: the worker's own ready() once it exists, "loading" before."""

    def __init__(self):
        self.fn: Callable[[], tuple[bool, str]] | None = None

    def __call__(self) -> tuple[bool, str]:
        return self.fn() if self.fn is not None else (False, "loading weights")


def setup_logging(cfg: WorkerConfig) -> None:
    logging.basicConfig(level=os.environ.get("GLM_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {cfg.worker_id}/r{cfg.tp_rank} %(levelname)s %(name)s: %(message)s")


def run_worker(cfg: WorkerConfig, module: str, build: Callable) -> None:
    """build(cfg, engine, io, metrics) -> worker with .run_forever(), .ready(), .alive flag."""
    setup_logging(cfg)
    if cfg.tp_rank > 0:
        fanout = TPFanout(cfg.tp_rank, cfg.tp_size, cfg.tp_store_port, cfg.device_for_rank(cfg.tp_rank))
        Engine(cfg, fanout).follow()
        fanout.close()
        return
    try:
        fleet_key()  # the leader signs and checks every control message: no key, no start
    except FleetKeyError as e:
        sys.exit(f"{cfg.worker_id}: {e}")
    port = leader_store_port(cfg.tp_size, cfg.tp_store_port)
    followers = spawn_followers(module, strip_tp_flags(sys.argv[1:]), cfg.tp_size, port)
    metrics = WorkerMetrics(cfg.worker_id, cfg.role)
    readiness = _Readiness()
    health = HealthServer(cfg.health_port, readiness, metrics.render).start()
    fanout = TPFanout(0, cfg.tp_size, port, cfg.device_for_rank(0))
    engine = Engine(cfg, fanout)
    io = WorkerIO(cfg.control_addr, cfg.router_addr)
    worker = build(cfg, engine, io, metrics)
    readiness.fn = worker.ready

    def _stop(*_):
        worker.alive = False

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger(module).info("%s ready to serve (health on :%d)", cfg.worker_id, health.port)
    try:
        worker.run_forever()
    finally:
        engine.stop()
        io.close()
        health.stop()
        fanout.close()
        for p in followers:
            p.wait(timeout=10)
