"""A scripted prefill + decode pair that speaks shared.protocol over real ZeroMQ sockets.

Used by the router's dispatch tests (in the test process, on a thread) to drive the failure
paths deterministically: busy decodes, silent (dead) workers, retryable errors, slow
streams. It plays the worker side of the protocol exactly: heartbeats (WorkerStatus),
Reserve -> Reserved/Busy, PrefillRequest -> first TokenEvent from the prefill, then the
rest from the decode, Abort ends a request. The generated text is `reply` tokenized, cycled.
The real workers are tested with the router in tests/e2e.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq

from glmserve.shared import protocol as P


@dataclass
class PeerWorker:
    worker_id: str
    role: str
    addr: str
    alive: bool = True  # False: no heartbeats, no answers (a dead or hung process)
    busy: bool = False  # decode: answer Reserve with Busy
    fail_retryable: bool = False  # prefill: answer PrefillRequest with a retryable RequestError
    free_pages: int = 100
    received: list = field(default_factory=list)


class ProtocolPeer:
    def __init__(self, events_addr: str, workers: list[PeerWorker], reply_ids: list[int],
                 token_delay_s: float = 0.0, eos_id: int | None = None):
        self.workers = {w.worker_id: w for w in workers}
        self.reply_ids, self.token_delay_s, self.eos_id = reply_ids, token_delay_s, eos_id
        self.ctx = zmq.Context()
        self.events = self.ctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.connect(events_addr)
        self.pulls = {}
        for w in workers:
            s = self.ctx.socket(zmq.PULL)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(w.addr)
            self.pulls[w.worker_id] = s
        self.active: dict[str, dict] = {}  # rid -> {"sampling", "sent", "decode"}
        self.aborted: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "ProtocolPeer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in [self.events, *self.pulls.values()]:
            s.close(0)
        self.ctx.term()

    def messages(self, kind: type, worker_id: str | None = None) -> list:
        ws = [self.workers[worker_id]] if worker_id else list(self.workers.values())
        return [m for w in ws for m in list(w.received) if isinstance(m, kind)]

    def _send(self, msg: P.Msg) -> None:
        self.events.send(P.encode(msg))

    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in self.pulls.values():
            poller.register(s, zmq.POLLIN)
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + 0.2
            for sock, _ in poller.poll(10):
                wid = next(k for k, v in self.pulls.items() if v is sock)
                self._on(self.workers[wid], P.decode(sock.recv()))
            self._step()

    def _heartbeat(self) -> None:
        for w in self.workers.values():
            if w.alive:
                running = sum(1 for a in self.active.values() if a["decode"] == w.worker_id)
                self._send(P.WorkerStatus(worker_id=w.worker_id, role=w.role, ready=True,
                                          free_pages=w.free_pages, total_pages=100, running=running))

    def _on(self, w: PeerWorker, msg: P.Msg) -> None:
        w.received.append(msg)
        if not w.alive:
            return
        if isinstance(msg, P.Reserve):
            if w.busy:
                self._send(P.Busy(rid=msg.rid, decode_id=w.worker_id, reason="no free pages"))
            else:
                self._send(P.Reserved(rid=msg.rid, decode_id=w.worker_id, page_ids=P.pack_ids([1, 2])))
        elif isinstance(msg, P.PrefillRequest):
            if w.fail_retryable:
                self._send(P.RequestError(rid=msg.rid, worker_id=w.worker_id, message="boom", retryable=True))
                return
            self.active[msg.rid] = {"sampling": msg.sampling, "sent": 0, "decode": msg.decode_id,
                                    "prefill": w.worker_id, "next": 0.0}
        elif isinstance(msg, P.Abort):
            self.aborted.add(msg.rid)
            self.active.pop(msg.rid, None)

    def _step(self) -> None:
        now = time.monotonic()
        for rid, a in list(self.active.items()):
            sender = self.workers[a["prefill"] if a["sent"] == 0 else a["decode"]]
            if not sender.alive or now < a["next"]:
                continue
            sp: P.SamplingParams = a["sampling"]
            tid = self.reply_ids[a["sent"] % len(self.reply_ids)]
            a["sent"] += 1
            a["next"] = now + self.token_delay_s
            done_len = a["sent"] >= sp.max_new_tokens
            done_stop = tid in sp.stop_token_ids or (tid == self.eos_id and not sp.ignore_eos)
            finished = done_len or done_stop
            top = [(tid, -0.5)] * sp.top_logprobs if sp.logprobs else []
            self._send(P.TokenEvent(rid=rid, worker_id=sender.worker_id, token_ids=P.pack_ids([tid]),
                                    logprobs=[-0.5] if sp.logprobs else [], top_logprobs=[top] if sp.logprobs else [],
                                    finished=finished, finish_reason=("stop" if done_stop else "length") if finished else None))
            if finished:
                self.active.pop(rid)
