"""An idle worker checks its page accounting: pages still used while it holds no request are a
leak, logged loudly (ERROR) and counted in glm_worker_page_leaks_total. Real Engine and
allocator in-process; the leak is made by allocating for a request the worker never saw."""

from __future__ import annotations

import logging

from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.shared.worker_common.config import common_parser, worker_config
from glmserve.shared.worker_common.engine import Engine
from glmserve.shared.worker_common.metrics import WorkerMetrics
from glmserve.shared.worker_common.tp import TPFanout
from glmserve.prefill_worker.worker import PrefillWorker


def test_idle_prefill_reports_leaked_pages(tmp_path, caplog):
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=0)
    a = common_parser("prefill").parse_args(["--model_dir", model_dir, "--control_addr", "tcp://127.0.0.1:1",
                                             "--router_addr", "tcp://127.0.0.1:2", "--page_size", "4",
                                             "--num_pages", "16"])
    cfg = worker_config("prefill", a)
    pages = PageAllocator(16)
    metrics = WorkerMetrics("p0", "prefill")
    worker = PrefillWorker(cfg, {}, Engine(cfg, TPFanout(0, 1, 0, "cpu")), None, metrics, pages, 64)
    worker._check_idle(100.0)
    worker._check_idle(102.0)  # idle > 1 s, nothing used: no leak
    assert metrics.page_leaks._value.get() == 0
    pages.alloc_for("ghost", 3)
    worker._idle_since = None
    with caplog.at_level(logging.ERROR, logger="glmserve.prefill_worker"):
        worker._check_idle(200.0)
        worker._check_idle(201.5)
    assert metrics.page_leaks._value.get() == 3
    assert any("PAGE LEAK" in r.message and "ghost" in r.message for r in caplog.records)
