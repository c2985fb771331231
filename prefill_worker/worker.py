"""The prefill worker leader's loop (TP rank 0 of a prefill worker process).

Each turn: read control messages (PrefillRequest, Abort, LinkInfo), run one chunked-prefill
step if any prompt waits, push complete KV pages to decode workers, send first tokens to the
router, poll transfers and free pages whose sends completed, heartbeat every --heartbeat_s.
"""

from __future__ import annotations

import logging
import os
import time

from glmserve.shared import protocol as P
from glmserve.shared.worker_common.engine import Engine
from glmserve.shared.worker_common.io import PROCESS_INSTANCE, WorkerIO
from glmserve.shared.worker_common.metrics import WorkerMetrics
from glmserve.shared.worker_common.plan import LinkOp, StepPlan, seq_plan
from glmserve.shared.worker_common.sampling import generator_for, sample_rows
from glmserve.shared.worker_common.validate import check_request
from glmserve.prefill_worker.pusher import Push, Pusher
from glmserve.prefill_worker.scheduler import Chunk, PrefillScheduler, PrefillSeq, pages_for

log = logging.getLogger("glmserve.prefill_worker")

LINK_WAIT_S = 5.0  # a request for a decode we are (re)linking to waits this long for the link


class PrefillWorker:
    def __init__(self, cfg, decodes: dict[str, str], engine: Engine, io: WorkerIO, metrics: WorkerMetrics,
                 pages, chunk_budget: int, relink_check_s: float = 5.0):
        self.cfg, self.decodes, self.engine, self.io, self.metrics, self.pages = cfg, decodes, engine, io, metrics, pages
        self.sched = PrefillScheduler(pages, cfg.page_size, chunk_budget)
        self.pusher = Pusher(cfg.worker_id, cfg.page_size, engine.cache.layout.page_bytes())
        self.eos_ids = frozenset(engine.runner.config.eos_token_ids)
        self.generation = time.time_ns() // 1000 % (1 << 62)
        self.links: dict[str, int] = {}  # decode id -> generation of the live link
        self.pending_ops: list[LinkOp] = []  # link ops for the next plan (connect / wait)
        self.alive = True
        self._last_beat = self._last_hello = self._last_relink_check = 0.0
        self.relink_check_s = relink_check_s
        # requests whose decode has no KV link with us yet: rid -> (request, deadline); admitted when it is up
        self.awaiting_link: dict[str, tuple[P.PrefillRequest, float]] = {}
        self._idle_since: float | None = None
        # GLM_PREFILL_SYNC_SENDS=1: after announcing a step's pushes, block until they completed,
        # as a device-wide host sync in sampling would on CUDA (a CPU test of the ordering rule)
        self._sync_sends = os.environ.get("GLM_PREFILL_SYNC_SENDS", "") == "1"

    # ---- readiness ----------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if not self.links:
            return False, "no KV link to any decode worker yet"
        return True, ""

    # ---- loop -----------------------------------------------------------------------
    def run_forever(self) -> None:
        while self.alive:
            # prompts queued: don't wait; only pushes in flight: wait 1 ms (the link's thread gets the
            # GIL while this one sleeps in zmq); idle: 20 ms
            queued = self.sched.num_queued() > 0
            for msg in self.io.recv(0 if queued else 1 if self.pusher.inflight else 20):
                try:
                    self.handle(msg)
                except Exception:  # noqa: BLE001 - one bad message must not take the worker down
                    log.exception("prefill %s: handling %s failed", self.cfg.worker_id, type(msg).__name__)
            self.step()
            self.poll_sends()
            self.housekeeping()

    def handle(self, msg: P.Msg) -> None:
        if isinstance(msg, P.PrefillRequest):
            self.on_request(msg)
        elif isinstance(msg, P.Abort):
            self.on_abort(msg.rid)
        elif isinstance(msg, P.LinkInfo):
            self.on_link_info(msg)
        else:
            log.warning("prefill %s: unexpected %s", self.cfg.worker_id, type(msg).__name__)

    def on_request(self, msg: P.PrefillRequest) -> None:
        prompt = P.unpack_ids(msg.prompt_ids)
        d = msg.decode_id
        if d in self.links and msg.decode_link_epoch > self.links[d]:
            # the decode restarted or rebuilt its end after our link was built (an idle gloo/NCCL
            # link does not notice a dead peer): ours is stale. Rebuild it now.
            log.warning("prefill %s: %s reserved on link epoch %d, ours is %d: rebuilding", self.cfg.worker_id,
                        d, msg.decode_link_epoch, self.links[d])
            self._lost_link(d)
            self._last_hello = 0.0  # hello at the next housekeeping, not in 0.5 s
        if d not in self.links:  # wait for the link (bounded) rather than fail a request it will serve
            if d in self.decodes:
                self.awaiting_link[msg.rid] = (msg, time.monotonic() + LINK_WAIT_S)
            else:
                self.io.to_router(P.RequestError(rid=msg.rid, worker_id=self.cfg.worker_id,
                                                 message=f"prefill {self.cfg.worker_id} has no decode {d!r}"))
            return
        seq = PrefillSeq(msg.rid, prompt, msg.sampling, msg.decode_id, P.unpack_ids(msg.decode_page_ids))
        mc = self.engine.runner.config
        try:
            bad = check_request(prompt, msg.sampling, mc.max_position_embeddings, mc.vocab_size)
            if not bad and pages_for(len(prompt), self.cfg.page_size) > self.pages.capacity:
                bad = f"prompt needs more KV pages than this prefill worker has ({self.pages.capacity})"
            if not bad and (self.sched.has(msg.rid) or msg.rid in self.pusher.inflight):
                bad = f"duplicate request id {msg.rid}"
            if bad:
                raise ValueError(bad)
            self.sched.add(seq)
        except ValueError as e:
            self.io.to_router(P.RequestError(rid=msg.rid, worker_id=self.cfg.worker_id, message=str(e)))

    def on_abort(self, rid: str) -> None:
        if self.awaiting_link.pop(rid, None) is not None:
            return  # not admitted: nothing allocated
        seq = self.sched.abort(rid)
        if seq is None:
            return
        self.metrics.aborts.inc()
        if seq.page_ids:  # admitted: the decode may be waiting for pushes; tell it none follow
            self._announce(seq.decode_id, self.pusher.abort_announce(seq))
        else:
            self.pages.release(rid)

    def on_link_info(self, msg: P.LinkInfo) -> None:
        """Connect when the decode announces a new link epoch in answer to our current hello."""
        d = msg.decode_id
        if msg.reply_to != self.generation or d not in self.decodes:
            return  # stale answer, or a decode we were not configured with
        if self.links.get(d) == msg.generation and self.engine.links.has(d):
            return
        op = LinkOp("connect", d, host=msg.link_host, port=msg.link_port)
        self.engine.lead(StepPlan(mode="", link_ops=[op]))  # blocks until the decode side joins
        if not self.engine.links.has(d):
            self.metrics.handoff_failure("link_connect")
            self._lost_link(d)
            return
        self.links[d] = msg.generation
        log.info("prefill %s: KV link to %s up (epoch %d)", self.cfg.worker_id, d, msg.generation)

    def _admit_linked(self, now: float) -> None:
        """Requests parked for a link: admit those whose link is up; fail (retryable: no token was
        sent) those that waited LINK_WAIT_S."""
        for rid, (msg, deadline) in list(self.awaiting_link.items()):
            if msg.decode_id in self.links:
                del self.awaiting_link[rid]
                self.on_request(msg)
            elif now > deadline:
                del self.awaiting_link[rid]
                self.io.to_router(P.RequestError(
                    rid=rid, worker_id=self.cfg.worker_id, retryable=True,
                    message=f"prefill {self.cfg.worker_id} has no KV link to {msg.decode_id} (waited {LINK_WAIT_S:g} s)"))

    def _lost_link(self, decode_id: str) -> None:
        """Forget the link and take a new hello generation, so the decode accepts a fresh one."""
        self.links.pop(decode_id, None)
        self.generation += 1

    # ---- one step -------------------------------------------------------------------
    def step(self) -> None:
        chunks = self.sched.schedule()
        ops, self.pending_ops = self.pending_ops, []
        if not chunks:
            if ops:
                self.engine.lead(StepPlan(mode="", link_ops=ops))
            return
        t0 = time.monotonic()
        plan = StepPlan(mode="prefill", link_ops=ops)
        for c in chunks:
            ids = c.seq.prompt_ids[c.start : c.start + c.length]
            # MTP rows p < prompt_len - 1 take (h_p, x_{p+1}); the decode writes the last one
            mtp = c.seq.prompt_ids[c.start + 1 : min(c.start + c.length, c.seq.prompt_len - 1) + 1]
            plan.seqs.append(seq_plan(ids, c.start, c.seq.page_ids, want_logits=c.is_last,
                                      mtp_ids=mtp if self.engine.runner.has_mtp else None))
        pushes = self._pushes(chunks, plan)
        out = self.engine.lead(plan)  # forward, then this step's sends on every rank (queued, not waited)
        for push in pushes.values():  # announce before sampling: its host sync may wait on the sends
            self._announce(push.decode_id, push.announce)
        if self._sync_sends and pushes:
            self.engine.links.wait_posted(timeout_s=20.0)
        self._first_tokens(chunks, out.logits)
        self.metrics.add_tokens(sum(c.length for c in chunks))
        self.metrics.step_time.observe(time.monotonic() - t0)

    def _announce(self, decode_id: str, ann: P.KVChunkReady) -> None:
        """Send a push announcement stamped with the epoch of the link its send went on."""
        ann.link_epoch = self.links.get(decode_id, 0)
        self.io.to_peer(self.decodes[decode_id], ann)

    def _pushes(self, chunks: list[Chunk], plan: StepPlan) -> dict[str, Push]:
        """Send ops for every page this step completes (appended to the plan); by rid."""
        pushes: dict[str, Push] = {}
        row = -1
        for c in chunks:
            row += c.length  # row of this chunk's last token in the step's hidden states [T, H]
            push = self.pusher.push(c.seq, hidden_row=row)
            if push is not None:
                plan.link_ops.append(push.op)
                pushes[c.seq.rid] = push
        return pushes

    def _first_tokens(self, chunks: list[Chunk], logits) -> None:
        """Sample the first token of every finished prompt; send it to the router now (counted once)
        and to the decode (which continues from it)."""
        last = [c.seq for c in chunks if c.is_last]
        if not last:
            return
        rows = sample_rows(logits, [s.sampling for s in last], [s.prompt_ids for s in last],
                           [s.prompt_len for s in last], [generator_for(s.sampling, device=logits.device) for s in last])
        events, firsts = [], []
        for seq, r in zip(last, rows):
            reason = first_finish_reason(r.token_id, seq.sampling, self.eos_ids)
            want_lp = seq.sampling.logprobs
            events.append(P.TokenEvent(
                rid=seq.rid, worker_id=self.cfg.worker_id, token_ids=P.pack_ids([r.token_id]),
                logprobs=[r.logprob] if want_lp else [], top_logprobs=[r.top] if want_lp else [],
                finished=reason is not None, finish_reason=reason,
            ))
            firsts.append((seq.decode_id, P.FirstToken(
                rid=seq.rid, prefill_id=self.cfg.worker_id, token_id=r.token_id, finished=reason is not None)))
        self.io.tokens_to_router(events)  # before the decodes hear of them: the router sees this token first
        for decode_id, msg in firsts:
            self.io.to_peer(self.decodes[decode_id], msg)

    # ---- transfers, heartbeat, leak check -------------------------------------------
    def poll_sends(self) -> None:
        for rid, entry in list(self.pusher.inflight.items()):
            for xfer in list(entry.xfers):
                state = self.engine.links.poll(entry.seq.decode_id, xfer)
                if state == "pending":
                    continue
                self.pusher.done_xfer(rid, xfer)
                if state not in ("done", "aborted"):
                    self._link_failed(entry.seq, state)
        for entry in self.pusher.releasable():
            self.pending_ops.append(LinkOp("wait", entry.seq.decode_id, entry.seq.rid))
            self.pages.release(entry.seq.rid)
            self.metrics.requests.inc()

    def _link_failed(self, seq: PrefillSeq, state: str) -> None:
        self.metrics.handoff_failure(state)
        if seq.decode_id in self.links:
            self._lost_link(seq.decode_id)  # the next hello / LinkInfo round rebuilds it
        self.io.to_router(P.RequestError(rid=seq.rid, worker_id=self.cfg.worker_id,
                                         message=f"KV transfer to {seq.decode_id} {state}"))

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_hello > 0.5:
            self._last_hello = now
            for d in [d for d in self.links if not self.engine.links.has(d)]:
                self._lost_link(d)  # torn down (transfer deadline, peer gone)
            recheck = now - self._last_relink_check >= self.relink_check_s
            self._last_relink_check = now if recheck else self._last_relink_check
            for wid, addr in self.decodes.items():
                if wid not in self.links or recheck:  # unlinked: every 0.5 s; else every --relink_check_s
                    self.io.to_peer(addr, P.LinkHello(prefill_id=self.cfg.worker_id, reply_addr=self.cfg.control_addr,
                                                      tp_size=self.cfg.tp_size, generation=self.generation))
        self._admit_linked(now)
        self.engine.links.report_stuck()
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            self.heartbeat()
        self._check_idle(now)

    def heartbeat(self) -> None:
        ok, _ = self.ready()
        used, free = self.pages.num_used, self.pages.num_free
        self.metrics.pages(used, free)
        if self.engine.experts is not None:
            self.metrics.experts(self.engine.experts.window())
        self.metrics.ready.set(int(ok))
        self.metrics.queue_depth.set(self.sched.num_queued())
        self.metrics.queued_tokens.set(self.sched.queued_tokens())
        self.metrics.running.set(len(self.pusher.inflight))
        self.metrics.kv_totals(*self.engine.links.totals())
        self.io.to_router(P.WorkerStatus(
            worker_id=self.cfg.worker_id, role="prefill", ready=ok, queued_tokens=self.sched.queued_tokens(),
            running=len(self.pusher.inflight), free_pages=free, total_pages=self.pages.capacity, used_pages=used,
            tp_size=self.cfg.tp_size, instance=PROCESS_INSTANCE,
        ))

    def _check_idle(self, now: float) -> None:
        """Idle for 1 s: every page must be free; a leak is logged loudly, counted and reclaimed."""
        if self.sched.num_queued() or self.pusher.inflight:
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since > 1.0:
            self._idle_since = now + 3600.0  # once per idle period
            leaked = self.pages.check_idle()
            if leaked:
                log.error("PAGE LEAK on prefill %s: %s", self.cfg.worker_id, leaked)
                self.metrics.page_leaks.inc(sum(len(leak.page_ids) for leak in leaked))


def first_finish_reason(token: int, sampling: P.SamplingParams, eos_ids: frozenset[int]) -> str | None:
    if not sampling.ignore_eos and token in eos_ids:
        return "stop"
    if token in sampling.stop_token_ids:
        return "stop"
    return "length" if sampling.max_new_tokens <= 1 else None
