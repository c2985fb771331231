"""Dispatch of generation runs to prefill/decode workers over ZeroMQ, and their events back.

Runs in the router process, on the HTTP server's asyncio loop. Sockets: a PULL bound at
--events_addr (every worker leader pushes its events there), a PUSH per worker leader.

Flow of a run (runs.py): Reserve (naming the ready prefill with fewest queued tokens) -> the
ready decode with most free pages; on Reserved, PrefillRequest -> that prefill; on Busy, the
next decode, else back to the queue. The bound (max_queue) counts queued and reserving runs
and is checked at admission only, so a 429 is always the HTTP status, never a mid-stream event. Tokens arrive from the prefill (first) then the
decode. Invariants: every run that leaves the table got its final Chunk or a Failure, and
every worker that may hold pages for it was sent an Abort (abort is idempotent on workers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import zmq
import zmq.asyncio

from glmserve.router.config import RouterConfig
from glmserve.router.errors import APIError, overloaded
from glmserve.router.metrics import RouterMetrics
from glmserve.router.runs import Chunk, Failure, Phase, Run
from glmserve.router.workers import WorkerRegistry
from glmserve.shared import protocol as P

log = logging.getLogger(__name__)
MONITOR_PERIOD_S = 0.25


class Dispatcher:
    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics):
        self.cfg = cfg
        self.metrics = metrics
        self.registry = WorkerRegistry(cfg.prefill, cfg.decode, cfg.heartbeat_timeout_s)
        self.runs: dict[str, Run] = {}  # rid (with attempt) -> run, for every run not DONE
        self.queue: collections.deque[Run] = collections.deque()
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._push: dict[str, zmq.Socket] = {}
        self._pull: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        self._pull.bind(self.cfg.events_addr)
        for wid, w in self.registry.workers.items():  # sends never block: NOBLOCK + a deep HWM
            self._push[wid] = s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0), s.setsockopt(zmq.SNDHWM, 10000), s.connect(w.addr)
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._monitor_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for run in list(self.runs.values()) + list(self.queue):
            self._finish(run, Failure(APIError("the router is shutting down", 503)), abort=True)
        for s in self._push.values():
            s.close(linger=0)
        if self._pull is not None:
            self._pull.close(linger=0)

    # ---- API for the endpoints ------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        return self.registry.readiness(time.monotonic())

    def submit(self, base_rid: str, prompt_ids: list[int], sampling: P.SamplingParams) -> Run:
        """Start a run; 503 when no worker can take it, 429 when the queue is full."""
        ok, why = self.readiness()
        if not ok:
            raise APIError(f"no worker is ready to serve ({why})", 503, code="no_ready_workers",
                           headers={"Retry-After": "1"})
        waiting = self.num_waiting()
        if waiting >= self.cfg.max_queue:  # queued + awaiting a reservation: admission is the only 429
            raise overloaded(waiting)
        run = Run(base_rid, prompt_ids, P.pack_ids(prompt_ids), sampling)
        self.queue.append(run)
        self._drain_queue()
        return run

    def num_waiting(self) -> int:
        """Runs not yet admitted by a decode: queued, or with a Reserve unanswered (bounded by max_queue)."""
        return len(self.queue) + sum(1 for r in self.runs.values() if r.phase is Phase.RESERVING)

    def abort(self, run: Run, reason: str = "abort") -> None:
        """End a run from the router side (client gone, stop string, timeout); idempotent."""
        if run.phase is not Phase.DONE:
            self._finish(run, Chunk([], [], [], True, "abort"), abort=True, reason=reason)

    # ---- sending -----------------------------------------------------------------------
    def _send(self, wid: str, msg: P.Msg) -> bool:
        try:
            self._push[wid].send(P.encode(msg), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # peer queue full (HWM) or socket gone: treat as unavailable
            log.warning("send to %s failed: %s", wid, e)
            return False

    def _send_abort(self, run: Run, reason: str) -> None:
        for wid in run.workers():
            self._send(wid, P.Abort(rid=run.rid, reason=reason))

    def _detach(self, run: Run) -> None:
        self.runs.pop(run.rid, None)
        for wid in run.workers():
            self.registry.workers[wid].inflight.discard(run.rid)

    def _finish(self, run: Run, final: Chunk | Failure, abort: bool, reason: str = "abort") -> None:
        if run.phase is Phase.DONE:
            return
        if abort:
            self._send_abort(run, reason)
        if run.phase is Phase.QUEUED and run in self.queue:
            self.queue.remove(run)
        self._detach(run)
        run.phase = Phase.DONE
        run.queue.put_nowait(final)
        self._update_gauges()

    def _requeue(self, run: Run, why: str, reason: str) -> None:
        """Re-run `run` from scratch (no token was sent) under a new rid, or fail it. reason: a short
        label for router_reruns_total (why: the log's words)."""
        self.metrics.reruns.labels(reason).inc()
        self._send_abort(run, "rerun")
        self._detach(run)
        run.failed_workers.update(run.workers())
        run.tried_decodes.clear()
        if run.attempt >= self.cfg.max_retries:
            self._fail(run, f"request failed after {run.attempt + 1} attempts: {why}", 503)
            return
        log.info("re-running %s: %s", run.rid, why)
        run.attempt += 1
        run.phase, run.decode_id, run.prefill_id, run.prefill_done = Phase.QUEUED, None, None, False
        self.queue.appendleft(run)
        self._drain_queue()

    def _fail(self, run: Run, message: str, status: int = 500, code: str | None = "worker_error") -> None:
        self._finish(run, Failure(APIError(message, status, code=code)), abort=True, reason="error")

    def _drain_queue(self) -> None:
        """Send a Reserve for queued runs, in order, while some decode may accept them."""
        now = time.monotonic()
        while self.queue:
            run = self.queue[0]
            decode = self.registry.pick_decode(now, run.tried_decodes, run.failed_workers)
            if decode is None:
                break
            self.queue.popleft()
            self._reserve(run, decode.worker_id, now)
            if run.phase is Phase.QUEUED:  # no prefill ready: wait
                break
        self._update_gauges()

    def _reserve(self, run: Run, decode_id: str, now: float) -> None:
        """Reserve pages on `decode_id` for a prefill picked now (the decode learns which one)."""
        prefill = self.registry.pick_prefill(now, len(run.prompt_ids), run.failed_workers)
        if prefill is None:
            run.phase = Phase.QUEUED
            self.queue.appendleft(run)
            return
        run.phase, run.deadline = Phase.RESERVING, now + self.cfg.reserve_timeout_s
        run.decode_id, run.prefill_id = decode_id, prefill.worker_id
        run.tried_decodes.add(decode_id)
        self.runs[run.rid] = run
        self.registry.workers[decode_id].inflight.add(run.rid)
        prefill.inflight.add(run.rid)
        msg = P.Reserve(rid=run.rid, prompt_ids=run.prompt_bytes, sampling=run.sampling,
                        prefill_id=prefill.worker_id)
        if not self._send(decode_id, msg):
            self._on_busy(run, decode_id)

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.num_waiting())
        self.metrics.inflight_runs.set(len(self.runs))

    # ---- receiving -----------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            data = await self._pull.recv()
            try:
                msg = P.decode(data)
            except P.ProtocolError as e:
                log.warning("dropped a bad event: %s", e)
                continue
            for m in P.unbatch(msg):
                try:
                    self._on_message(m)
                except Exception:  # one bad event must not stop the loop that serves every request
                    log.exception("error handling %s", type(m).__name__)

    def _on_message(self, msg: P.Msg) -> None:
        now = time.monotonic()
        if isinstance(msg, P.WorkerStatus):
            if self.registry.restarted(msg):  # its old process and every request on it are gone
                self._lose_worker(msg.worker_id)
            if not self.registry.on_status(msg, now):
                log.debug("heartbeat from unconfigured worker %s ignored", msg.worker_id)
            self._drain_queue()
            return
        run = self.runs.get(msg.rid)
        if run is None:  # stale attempt or a run ended here: make sure the worker frees it
            wid = msg.decode_id if isinstance(msg, P.Reserved) else getattr(msg, "worker_id", None)
            live = isinstance(msg, P.Reserved) or (isinstance(msg, P.TokenEvent) and not msg.finished)
            if live and wid in self._push:
                self._send(wid, P.Abort(rid=msg.rid, reason="unknown rid"))
            return
        if isinstance(msg, P.Reserved):
            self._on_reserved(run, msg, now)
        elif isinstance(msg, P.Busy):
            self._on_busy(run, msg.decode_id)
        elif isinstance(msg, P.TokenEvent):
            self._on_tokens(run, msg)
        elif isinstance(msg, P.RequestError):
            self._on_error(run, msg)

    def _on_reserved(self, run: Run, msg: P.Reserved, now: float) -> None:
        if run.phase is not Phase.RESERVING or msg.decode_id != run.decode_id:
            self._send(msg.decode_id, P.Abort(rid=run.rid, reason="late reservation"))
            return
        prefill = self.registry.workers[run.prefill_id]
        if not prefill.ready(now, self.cfg.heartbeat_timeout_s):
            self._requeue(run, f"prefill worker {prefill.worker_id} is not ready", "prefill_not_ready")
            return
        run.phase = Phase.RUNNING
        req = P.PrefillRequest(rid=run.rid, prompt_ids=run.prompt_bytes, sampling=run.sampling,
                               decode_id=msg.decode_id, decode_page_ids=msg.page_ids,
                               decode_link_epoch=msg.link_epoch)
        if not self._send(prefill.worker_id, req):
            self._requeue(run, f"prefill worker {prefill.worker_id} is not accepting messages", "prefill_send_failed")

    def _on_busy(self, run: Run, decode_id: str) -> None:
        if run.phase is not Phase.RESERVING or decode_id != run.decode_id:
            return
        self.registry.workers[decode_id].busy = True
        self._detach(run)
        run.phase, run.decode_id, run.prefill_id = Phase.QUEUED, None, None
        nxt = self.registry.pick_decode(time.monotonic(), run.tried_decodes, run.failed_workers)
        if nxt is not None:
            self._reserve(run, nxt.worker_id, time.monotonic())
            return
        # Every decode said busy: wait in line for the next heartbeat. Admission counted this run
        # among the waiting, so the line stays within max_queue and the run is never shed here.
        run.tried_decodes.clear()
        self.queue.appendleft(run)
        self._update_gauges()

    def _on_tokens(self, run: Run, msg: P.TokenEvent) -> None:
        if msg.worker_id == run.prefill_id:
            run.prefill_done = True
        ids = P.unpack_ids(msg.token_ids)
        run.num_tokens += len(ids)
        chunk = Chunk(ids, list(msg.logprobs), [list(x) for x in msg.top_logprobs],
                      msg.finished, msg.finish_reason)
        if msg.finished:
            self._finish(run, chunk, abort=False)
        else:
            run.queue.put_nowait(chunk)

    def _on_error(self, run: Run, msg: P.RequestError) -> None:
        if msg.retryable and run.num_tokens == 0:
            self._requeue(run, f"{msg.worker_id}: {msg.message}", "worker_error")
        else:
            self._fail(run, f"worker {msg.worker_id} failed the request: {msg.message}")

    # ---- deadlines and liveness --------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_PERIOD_S)
            try:
                self._check(time.monotonic())
            except Exception:
                log.exception("monitor check failed")

    def _check(self, now: float) -> None:
        for w in self.registry.expired(now):
            self._lose_worker(w.worker_id)
        for run in list(self.runs.values()):
            if now - run.created > self.cfg.request_timeout_s:
                self._fail(run, f"request timed out after {self.cfg.request_timeout_s:.0f} s", 504, "timeout")
            elif run.phase is Phase.RESERVING and now > run.deadline:
                self.metrics.reserve_timeouts.inc()
                self._on_busy(run, run.decode_id)
        for run in [r for r in self.queue if now - r.created > self.cfg.queue_timeout_s]:
            self._fail(run, "no decode worker accepted the request in time", 503, "queue_timeout")
        self._drain_queue()

    def _lose_worker(self, wid: str) -> None:
        w = self.registry.workers[wid]
        for rid in list(w.inflight):
            run = self.runs.get(rid)
            w.inflight.discard(rid)
            if run is not None:
                self._on_worker_lost(run, wid)

    def _on_worker_lost(self, run: Run, wid: str) -> None:
        if wid == run.prefill_id and run.prefill_done:
            return  # its part is done; the decode carries on
        why = f"worker {wid} stopped answering (no heartbeat for {self.cfg.heartbeat_timeout_s:.0f} s, or restarted)"
        if run.num_tokens == 0:
            self._requeue(run, why, "worker_lost")
        else:
            self._fail(run, why, 503, "worker_lost")
