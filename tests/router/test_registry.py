"""WorkerRegistry (router/workers.py): readiness from heartbeats and the dispatch choices."""

from __future__ import annotations

from glmserve.router.workers import WorkerRegistry
from glmserve.shared.protocol import WorkerStatus


def _reg() -> WorkerRegistry:
    return WorkerRegistry({"p0": "tcp://a:1", "p1": "tcp://a:2"}, {"d0": "tcp://a:3", "d1": "tcp://a:4"}, 3.0)


def _beat(reg, wid, role, now, ready=True, **kw):
    assert reg.on_status(WorkerStatus(worker_id=wid, role=role, ready=ready, **kw), now)


def test_ready_needs_fresh_ready_heartbeat():
    reg = _reg()
    assert reg.readiness(0.0)[0] is False  # never seen
    _beat(reg, "p0", "prefill", 0.0)
    _beat(reg, "d0", "decode", 0.0, ready=False)
    assert reg.readiness(1.0)[0] is False  # decode says not ready (loading weights)
    _beat(reg, "d0", "decode", 1.0)
    assert reg.readiness(1.5)[0] is True
    assert reg.readiness(3.9)[0] is False  # p0 silent for 3.9 s
    _beat(reg, "p0", "prefill", 4.0)
    _beat(reg, "d0", "decode", 4.0)
    assert reg.readiness(4.1)[0] is True


def test_unconfigured_or_wrong_role_heartbeats_are_ignored():
    reg = _reg()
    assert not reg.on_status(WorkerStatus(worker_id="x9", role="decode", ready=True), 0.0)
    assert not reg.on_status(WorkerStatus(worker_id="p0", role="decode", ready=True), 0.0)
    assert reg.ready("decode", 0.1) == []


def test_pick_decode_most_free_pages_then_fewest_running_and_busy_skipped():
    reg = _reg()
    _beat(reg, "d0", "decode", 0.0, free_pages=10, running=0)
    _beat(reg, "d1", "decode", 0.0, free_pages=50, running=9)
    assert reg.pick_decode(0.1, set()).worker_id == "d1"
    assert reg.pick_decode(0.1, {"d1"}).worker_id == "d0"
    reg.workers["d1"].busy = True
    assert reg.pick_decode(0.1, set()).worker_id == "d0"
    assert reg.pick_decode(0.1, set(), avoid={"d0"}).worker_id == "d0"  # avoided, but the only one
    _beat(reg, "d1", "decode", 0.2, free_pages=10, running=1)  # a heartbeat clears busy
    _beat(reg, "d0", "decode", 0.2, free_pages=10, running=3)
    assert reg.pick_decode(0.3, set()).worker_id == "d1"


def test_pick_prefill_counts_tokens_sent_since_heartbeat():
    reg = _reg()
    _beat(reg, "p0", "prefill", 0.0, queued_tokens=0)
    _beat(reg, "p1", "prefill", 0.0, queued_tokens=100)
    assert reg.pick_prefill(0.1, 500).worker_id == "p0"  # p0 now counts 500 queued
    assert reg.pick_prefill(0.1, 10).worker_id == "p1"
    assert reg.pick_prefill(0.1, 10, avoid={"p1"}).worker_id == "p0"


def test_expired_lists_silent_workers_holding_requests():
    reg = _reg()
    _beat(reg, "d0", "decode", 0.0)
    reg.workers["d0"].inflight.add("r1")
    assert reg.expired(2.0) == []
    assert [w.worker_id for w in reg.expired(3.5)] == ["d0"]
