"""KV receive side of the decode worker leader: reservations and incoming pushes (pure Python).

Reserve -> pages for prompt + allowance, where allowance = min(max_new_tokens, reserve_cap)
(default cap 256 tokens; the running set grows pages one at a time past it), or Busy when the
pages or the --max_running slots are not there. KVChunkReady -> a "recv" LinkOp into the
announced pages (which must be this request's own, in order); the op is posted by every TP
rank before the next forward. Pushes for a request no longer held here (aborted, expired) are
drained into scratch so the link's order stays intact and no page of another request is written.

The handoff deadline runs from the Reserve and restarts at every accepted push (a long prompt
on a prefill that compiles kernels for its first long step only counts its time once).

Release happens exactly once, through `release`; an abort while recvs are in flight only marks
the request, and it is released when the last posted recv completed (let it finish, then free).
"""

from __future__ import annotations

import time

from glmserve.shared import protocol as P
from glmserve.shared.worker_common.plan import LinkOp
from glmserve.shared.worker_common.validate import check_request
from glmserve.decode_worker.state import DecodeSeq, Phase


def pages_for(num_tokens: int, page_size: int) -> int:
    return (num_tokens + page_size - 1) // page_size


class Handoffs:
    def __init__(self, pages, page_size: int, max_running: int, reserve_cap: int, deadline_s: float,
                 max_seq_len: int = 1 << 30, vocab_size: int = 1 << 30):
        self.pages = pages
        self.max_seq_len = max_seq_len  # prompt + max_new_tokens must fit the model's positions
        self.vocab_size = vocab_size
        self.page_size = page_size
        self.max_running = max_running
        self.reserve_cap = reserve_cap
        self.deadline_s = deadline_s
        self.seqs: dict[str, DecodeSeq] = {}  # every request not yet released (any phase < DONE)
        self.ops: list[LinkOp] = []  # recv / drain ops for the next plan

    def reserve(self, msg: P.Reserve, num_running: int = 0) -> DecodeSeq | str:
        """The new request, or the reason for Busy (`num_running`: requests already decoding)."""
        if msg.rid in self.seqs:
            return "duplicate request id"
        if len(self.seqs) + num_running >= self.max_running:
            return f"max_running {self.max_running} reached"
        prompt = P.unpack_ids(msg.prompt_ids)
        bad = check_request(prompt, msg.sampling, self.max_seq_len, self.vocab_size)
        if bad:
            raise ValueError(bad)
        allowance = min(msg.sampling.max_new_tokens, self.reserve_cap)
        need = pages_for(len(prompt) + allowance, self.page_size)
        if need > self.pages.capacity:
            raise ValueError(f"request needs {need} KV pages; this decode worker has {self.pages.capacity}")
        page_ids = self.pages.alloc_for(msg.rid, need)
        if page_ids is None:
            return "not enough free KV pages"
        seq = DecodeSeq(msg.rid, len(prompt), prompt, msg.sampling, page_ids, msg.prefill_id,
                        deadline=time.monotonic() + self.deadline_s)
        self.seqs[msg.rid] = seq
        return seq

    def on_chunk(self, msg: P.KVChunkReady) -> str | None:
        """Post the recv for one announced push; returns an error text when the push is refused."""
        seq = self.seqs.get(msg.rid)
        page_ids = P.unpack_ids(msg.page_ids)
        xfer = f"{msg.rid}/{msg.chunk_index}"
        if seq is None or seq.aborted:
            if page_ids or msg.has_hidden:  # keep the link's order: receive into scratch, drop
                self.ops.append(LinkOp("drain", msg.prefill_id, xfer, msg.page_ids, hidden_row=int(msg.has_hidden)))
                if seq is not None:
                    seq.pending_xfers.add(xfer)
            if seq is not None and msg.is_last:
                seq.last_announced = True
            return None
        if msg.chunk_index != seq.next_chunk or not _is_run(page_ids, seq.page_ids, seq.num_cached, self.page_size):
            return f"{msg.rid}: push {msg.chunk_index} out of order or into foreign pages"
        seq.next_chunk += 1
        seq.deadline = time.monotonic() + self.deadline_s  # the prefill made progress: the clock restarts
        seq.advance(Phase.RECEIVING)
        if page_ids or msg.has_hidden:
            self.ops.append(LinkOp("recv", msg.prefill_id, xfer, msg.page_ids, hidden_row=int(msg.has_hidden)))
            seq.pending_xfers.add(xfer)
        seq.num_cached = msg.num_tokens
        if msg.is_last:
            seq.last_announced = True
            seq.aborted = seq.aborted or msg.aborted
        return None

    def on_first_token(self, msg: P.FirstToken) -> None:
        """The prefill's first token (sent after its last push was announced); ignored for a
        request no longer held or already given up."""
        seq = self.seqs.get(msg.rid)
        if seq is None or seq.aborted or seq.has_first:
            return
        seq.token_ids.append(msg.token_id)
        seq.first_finished = msg.finished
        seq.has_first = True

    def abort(self, rid: str) -> DecodeSeq | None:
        seq = self.seqs.get(rid)
        if seq is not None:
            seq.aborted = True
        return seq

    def ready_to_finish(self) -> list[DecodeSeq]:
        """Requests whose handoff is over: all recvs done (to run, or to release if aborted), or
        aborted with no recv in flight (later pushes for it are drained, never land in pages).
        Pops them from `seqs`."""
        out = []
        for seq in list(self.seqs.values()):
            idle_abort = seq.aborted and not seq.pending_xfers
            if seq.handoff_complete() or idle_abort:
                out.append(self.seqs.pop(seq.rid))
        return out

    def expired(self) -> list[DecodeSeq]:
        """Requests whose handoff passed its deadline with no recv in flight (pop them)."""
        now = time.monotonic()
        out = [s for s in self.seqs.values() if s.expired(now) and not s.pending_xfers]
        for s in out:
            del self.seqs[s.rid]
        return out


def _is_run(page_ids: list[int], own: list[int], num_cached: int, page_size: int) -> bool:
    """The announced pages continue this request's prompt pages in order (num_cached tokens so far)."""
    start = num_cached // page_size
    return page_ids == own[start : start + len(page_ids)]

