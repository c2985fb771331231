"""The decode worker leader's loop (TP rank 0 of a decode worker process).

Each turn: read control messages (Reserve, KVChunkReady, Abort, LinkHello), post KV recvs,
move requests whose handoff completed into the running set, launch one DECODE step over all
running requests and sample on the device, then read back the step launched the turn before
(overlap loop, `step`), stream TokenEvents, release finished requests' pages, expire stuck
handoffs, heartbeat every --heartbeat_s, and check page accounting when idle.
"""

from __future__ import annotations

import logging
import time

from glmserve.shared import protocol as P
from glmserve.shared.worker_common.io import PROCESS_INSTANCE
from glmserve.shared.worker_common.plan import LinkOp, StepPlan
from glmserve.shared.worker_common.sampling import generator_for, needs_history, sample_async
from glmserve.decode_worker import mtp
from glmserve.decode_worker.mtp_metrics import MtpMetrics
from glmserve.decode_worker.handoff import Handoffs
from glmserve.decode_worker.running import RunningSet
from glmserve.decode_worker.state import DecodeSeq, InFlight, Phase, finish_reason

log = logging.getLogger("glmserve.decode_worker")


class DecodeWorker:
    def __init__(self, cfg, engine, io, metrics, pages, link_host: str, link_port: int,
                 max_running: int, reserve_cap: int = 256, handoff_deadline_s: float = 60.0,
                 max_seq_len: int = 0, mtp_chain_normed: bool = False, overlap: bool = True):
        self.cfg, self.engine, self.io, self.metrics, self.pages = cfg, engine, io, metrics, pages
        self.mtp_chain_normed = mtp_chain_normed  # --mtp_mode eagle_with_att (decode_worker/mtp.py)
        self.link_host, self.link_port = link_host, link_port
        engine.links.host_store(link_host, link_port)  # the KV-link rendezvous prefills connect to
        mc = engine.runner.config
        self.handoffs = Handoffs(pages, cfg.page_size, max_running, reserve_cap, handoff_deadline_s,
                                 max_seq_len=max_seq_len or mc.max_position_embeddings, vocab_size=mc.vocab_size)
        self.running = RunningSet(pages, cfg.page_size)
        self.mtp_metrics = MtpMetrics(metrics.registry, cfg.worker_id, cfg.mtp_step) if cfg.mtp_step else None
        self.eos_ids = frozenset(engine.runner.config.eos_token_ids)
        self.generation = time.time_ns() // 1000 % (1 << 62)
        self.prefill_gens: dict[str, int] = {}  # prefill id -> its LinkHello generation of the live link
        self.epochs: dict[str, int] = {}  # prefill id -> link epoch announced in LinkInfo
        self._epoch = self.generation  # epochs grow from the process's start id: unique across restarts
        # overlap loop: the launched step not yet read back (DECODE without MTP only)
        self.overlap = overlap and not cfg.mtp_step
        self.inflight: InFlight | None = None
        self._events: list[P.TokenEvent] = []  # of the step being read back (_emit), sent by _send_events
        self.alive = True
        self._last_beat = 0.0
        self._idle_since: float | None = None

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def run_forever(self) -> None:
        while self.alive:
            # stepping: don't wait; only handoffs in progress: wait 1 ms (the link's thread gets the
            # GIL while this one sleeps in zmq); idle: 20 ms
            stepping = bool(self.running) or self.inflight is not None
            for msg in self.io.recv(0 if stepping else 1 if self.handoffs.seqs else 20):
                try:
                    self.handle(msg)
                except Exception:  # noqa: BLE001 - one bad message must not take the worker down
                    log.exception("decode %s: handling %s failed", self.cfg.worker_id, type(msg).__name__)
            self.poll_recvs()
            self.step()
            self.housekeeping()

    def handle(self, msg: P.Msg) -> None:
        if isinstance(msg, P.Reserve):
            self.on_reserve(msg)
        elif isinstance(msg, P.KVChunkReady) and msg.link_epoch != self.epochs.get(msg.prefill_id):
            self.on_stale_push(msg)
        elif isinstance(msg, P.KVChunkReady):
            err = self.handoffs.on_chunk(msg)
            if err:
                self.metrics.handoff_failure("bad_push")
                log.error("decode %s: %s", self.cfg.worker_id, err)
        elif isinstance(msg, P.FirstToken):
            self.handoffs.on_first_token(msg)
        elif isinstance(msg, P.Abort):
            self.on_abort(msg.rid)
        elif isinstance(msg, P.LinkHello):
            self.on_hello(msg)
        else:
            log.warning("decode %s: unexpected %s", self.cfg.worker_id, type(msg).__name__)

    def on_reserve(self, msg: P.Reserve) -> None:
        try:
            res = self.handoffs.reserve(msg, len(self.running))
        except ValueError as e:
            self.io.to_router(P.RequestError(rid=msg.rid, worker_id=self.cfg.worker_id, message=str(e)))
            return
        if isinstance(res, str):
            self.io.to_router(P.Busy(rid=msg.rid, decode_id=self.cfg.worker_id, reason=res))
            return
        res.generator = generator_for(msg.sampling, self.engine.runner.config.vocab_size, draws_done=1,
                                      device=self.engine.device)
        linked = self.engine.links.has(msg.prefill_id)
        epoch = self.epochs[msg.prefill_id] if linked else self.generation  # else the floor (protocol.py)
        self.io.to_router(P.Reserved(rid=msg.rid, decode_id=self.cfg.worker_id, page_ids=P.pack_ids(res.page_ids),
                                     link_epoch=epoch))

    def on_abort(self, rid: str) -> None:
        seq = self.running.remove(rid)
        if seq is not None:
            self.metrics.aborts.inc()
            self.release(seq)
        elif self.handoffs.abort(rid) is not None:
            self.metrics.aborts.inc()  # released once its posted recvs completed

    def on_hello(self, msg: P.LinkHello) -> None:
        """Answer with LinkInfo; (re)accept a link when the prefill is new, restarted, or our end
        of its link is gone. A fresh epoch in the answer tells the prefill to connect now."""
        p = msg.prefill_id
        accept = self.prefill_gens.get(p) != msg.generation or not self.engine.links.has(p)
        if accept:
            self._epoch += 1
            self.epochs[p] = self._epoch
        self.io.to_peer(msg.reply_addr, P.LinkInfo(
            decode_id=self.cfg.worker_id, link_host=self.link_host, link_port=self.link_port,
            tp_size=self.cfg.tp_size, page_size=self.cfg.page_size, num_layers=self.engine.cache.layout.num_layers,
            generation=self.epochs.get(p, 0), reply_to=msg.generation))
        if not accept:
            return
        self.prefill_gens.pop(p, None)
        op = LinkOp("connect", p, host=self.link_host, port=self.link_port)
        self.engine.lead(StepPlan(mode="", link_ops=[op]))  # blocks until the prefill side joins
        if not self.engine.links.has(p):
            self.metrics.handoff_failure("link_connect")
            return
        self.prefill_gens[p] = msg.generation
        log.info("decode %s: KV link to %s up (epoch %d)", self.cfg.worker_id, p, self.epochs[p])

    # ---- handoffs -------------------------------------------------------------------
    def on_stale_push(self, msg: P.KVChunkReady) -> None:
        """A push posted on a link this end has since replaced (or on one from before this
        process started): none of its bytes come on the current link, so post no recv (that
        would pair with another transfer); a request still held here cannot complete."""
        log.warning("decode %s: push %s/%d from %s on link epoch %d (current %s): dropped", self.cfg.worker_id,
                    msg.rid, msg.chunk_index, msg.prefill_id, msg.link_epoch, self.epochs.get(msg.prefill_id))
        seq = self.handoffs.seqs.get(msg.rid)
        if seq is None or seq.aborted:
            return
        self.handoffs.abort(msg.rid)
        self.metrics.handoff_failure("link_down")
        self.io.to_router(P.RequestError(rid=msg.rid, worker_id=self.cfg.worker_id, retryable=True,
                                         message=f"KV link to {msg.prefill_id} was rebuilt during the handoff"))

    def poll_recvs(self) -> None:
        for seq in list(self.handoffs.seqs.values()):
            for xfer in list(seq.pending_xfers):
                state = self.engine.links.poll(seq.prefill_id, xfer)
                if state == "pending":
                    continue
                seq.pending_xfers.discard(xfer)
                self.handoffs.ops.append(LinkOp("wait", seq.prefill_id, xfer))
                if state not in ("done", "aborted"):
                    seq.aborted = True
                    self.metrics.handoff_failure(state)
                    self.io.to_router(P.RequestError(rid=seq.rid, worker_id=self.cfg.worker_id,
                                                     message=f"KV transfer from {seq.prefill_id} {state}"))
        for seq in self.handoffs.ready_to_finish():
            if seq.aborted or seq.first_finished:
                self.release(seq)
            else:
                seq.hidden = self.engine.links.take_hidden(seq.prefill_id, f"{seq.rid}/{seq.next_chunk - 1}")
                self.running.add(seq)
                if self.cfg.mtp_step:
                    mtp.seed_rows(seq)
        for seq in self.handoffs.expired():
            self.metrics.handoff_failure("timeout")
            self.io.to_router(P.RequestError(rid=seq.rid, worker_id=self.cfg.worker_id, retryable=True,
                                             message="KV handoff timed out"))
            self.release(seq)

    def release(self, seq: DecodeSeq) -> None:
        """End a request here once; its pages go back now, or after the step in flight that still
        writes its KV (overlap loop)."""
        if seq.phase == Phase.DONE:
            return
        seq.advance(Phase.DONE)
        self.metrics.requests.inc()
        if self.inflight is not None and seq.rid in self.inflight.rows:
            self.inflight.release_after.append(seq.rid)
        else:
            self.pages.release(seq.rid)

    # ---- one step -------------------------------------------------------------------
    def step(self) -> None:
        """Overlap loop (as mini-sglang's / SGLang's overlap scheduler): launch step N + 1, fed on the
        device by step N's sampled ids, before reading step N's tokens back, so the host's work for N
        (read back, emit, finish, plan) runs while the GPU computes N + 1. Without overlap (MTP,
        --disable_overlap_schedule, or a batch whose sampling reads token histories) each step is
        read back right after its launch: the same code with nothing in flight."""
        ops, self.handoffs.ops = self.handoffs.ops, []
        if self.cfg.mtp_step:
            batch, victim = self.running.schedule()
            if victim is not None:
                self._fail_stalled(victim)
            if batch:
                t0 = time.monotonic()
                self._mtp_step(batch, ops)
                self.metrics.step_time.observe(time.monotonic() - t0)
            elif ops:
                self.engine.lead(StepPlan(mode="", link_ops=ops))
            return
        prev = self.inflight
        if prev is not None and any(needs_history(s.sampling) for s in self.running.seqs.values()):
            self._drain()
            prev = None
        pending = prev.rows if prev is not None else {}
        batch, victim = self.running.schedule(pending)
        if victim is not None:
            self._fail_stalled(victim)
        if not batch:
            if ops:
                self.engine.lead(StepPlan(mode="", link_ops=ops))
            self._drain()
            return
        t0 = time.monotonic()
        plan = self.running.plan_for(batch, pending)
        plan.link_ops = ops
        plan.share_tokens = self.overlap
        out = self.engine.lead(plan)
        sampled = sample_async(out.logits, [s.sampling for s in batch], [s.token_ids for s in batch],
                               [s.prompt_len for s in batch], [s.generator for s in batch])
        if self.overlap:
            self.engine.share_tokens(sampled.ids)
        self.inflight = InFlight(batch, {s.rid: i for i, s in enumerate(batch)}, sampled)
        if prev is not None:
            self.metrics.overlap_steps.inc()
            self._finish(prev)  # the GPU runs the step just launched meanwhile
        if not self.overlap:
            self._drain()
        self.metrics.step_time.observe(time.monotonic() - t0)

    def _drain(self) -> None:
        """Read back the step in flight, if any (nothing is in flight afterwards)."""
        inf, self.inflight = self.inflight, None
        if inf is not None:
            self._finish(inf)

    def _finish(self, inf: InFlight) -> None:
        """Commit and stream a launched step's tokens. A row whose request ended meanwhile (finished
        at the step before, aborted, failed) is dropped; pages released while the step ran are freed
        now that it has written its KV."""
        rows = inf.sampled.rows()
        n = 0
        for seq, r in zip(inf.seqs, rows):
            if self.running.seqs.get(seq.rid) is not seq:
                self.metrics.overlap_dropped.inc()
                continue
            self.running.commit(seq, [r.token_id])
            self._emit(seq, [r])
            n += 1
        self._send_events()
        for rid in inf.release_after:
            self.pages.release(rid)
        self.metrics.add_tokens(n)

    def _fail_stalled(self, victim: DecodeSeq) -> None:
        self.running.remove(victim.rid)
        self.io.to_router(P.RequestError(rid=victim.rid, worker_id=self.cfg.worker_id, message="out of KV pages"))
        self.release(victim)

    def _mtp_step(self, batch: list[DecodeSeq], ops) -> None:
        """Draft one token per request with the MTP layer, verify, accept (decode_worker/mtp.py)."""
        k = self.cfg.mtp_step
        num_pages_before = [len(s.page_ids) for s in batch]
        use = [self.running.has_room(s, extra=k) for s in batch]  # every request drafts (lossless accept)
        drafts = mtp.draft(self.engine, batch, ops, k, use, chain_normed=self.mtp_chain_normed)
        results = mtp.verify_and_accept(self.engine, batch, drafts, use)
        for seq, u, before, (rows, hid) in zip(batch, use, num_pages_before, results):
            if self.mtp_metrics is not None:
                self.mtp_metrics.observe(k if u else 0, len(rows) - 1)
            rows = mtp.ends_early(seq, rows, self.eos_ids)
            mtp.commit(seq, rows, hid[: len(rows)])
            mtp.release_rejected_pages(seq, self.pages, self.cfg.page_size, before)
            self.metrics.add_tokens(len(rows))
            self._emit(seq, rows)
        self._send_events()
        self.metrics.mtp_drafts.inc(k * sum(use))
        self.metrics.mtp_accepted.inc(sum(len(r) - 1 for r, _ in results))

    def _send_events(self) -> None:
        """The step's TokenEvents to the router, in one frame (protocol.TokenEvents)."""
        events, self._events = self._events, []
        if events:
            self.io.tokens_to_router(events)

    def _emit(self, seq: DecodeSeq, rows) -> None:
        """Queue `rows`' tokens for the router (sent by _send_events at the end of the step)."""
        reason = finish_reason(seq, self.eos_ids)
        lp = seq.sampling.logprobs
        self._events.append(P.TokenEvent(
            rid=seq.rid, worker_id=self.cfg.worker_id, token_ids=P.pack_ids([r.token_id for r in rows]),
            logprobs=[r.logprob for r in rows] if lp else [], top_logprobs=[r.top for r in rows] if lp else [],
            finished=reason is not None, finish_reason=reason,
        ))
        if reason is not None:
            self.running.remove(seq.rid)
            self.release(seq)

    # ---- heartbeat and leak check ---------------------------------------------------
    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            used, free = self.pages.num_used, self.pages.num_free
            self.metrics.pages(used, free)
            if self.engine.experts is not None:
                self.metrics.experts(self.engine.experts.window())
            self.metrics.ready.set(1)
            self.metrics.running.set(len(self.running))
            self.metrics.queue_depth.set(len(self.handoffs.seqs))
            self.metrics.kv_totals(*self.engine.links.totals())
            self.metrics.graph_steps_total(self.engine.runner.graph_runs())
            self.io.to_router(P.WorkerStatus(
                worker_id=self.cfg.worker_id, role="decode", ready=self.ready()[0], running=len(self.running),
                queued_tokens=sum(s.prompt_len for s in self.handoffs.seqs.values()),
                free_pages=free, total_pages=self.pages.capacity, used_pages=used, tp_size=self.cfg.tp_size, instance=PROCESS_INSTANCE,
            ))
        self.engine.links.report_stuck()
        self._check_idle(now)

    def _check_idle(self, now: float) -> None:
        if self.running or self.handoffs.seqs or self.inflight is not None:
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since > 1.0:
            self._idle_since = now + 3600.0
            leaked = self.pages.check_idle()
            if leaked:
                log.error("PAGE LEAK on decode %s: %s", self.cfg.worker_id, leaked)
                self.metrics.page_leaks.inc(sum(len(leak.page_ids) for leak in leaked))
