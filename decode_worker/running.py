"""The decode running set: continuous batching with page accounting (decode worker leader).

Requests join after their handoff and leave when they finish, every step. A step takes every
running request that has a KV page for its next token: one new token per sequence (DECODE
mode; MTP's VERIFY adds K drafts per sequence here, and a CUDA-graph runner pads the batch to
a bucket — both only change `plan_for` and `commit`). A request whose next token crosses its
reserved pages grows by one page; when none is free it sits the step out ("stalled"). If every
running request is stalled, the newest one is failed to free pages (no deadlock). Under the
overlap loop a request may have a token in flight (`pending`): the step after writes one further.
"""

from __future__ import annotations

from glmserve.shared.protocol import pack_ids
from glmserve.shared.worker_common.plan import StepPlan, seq_plan
from glmserve.decode_worker.state import DecodeSeq, Phase


class RunningSet:
    def __init__(self, pages, page_size: int):
        self.pages = pages
        self.page_size = page_size
        self.seqs: dict[str, DecodeSeq] = {}  # insertion order = join order

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: DecodeSeq) -> None:
        seq.advance(Phase.RUNNING)
        seq.num_cached = seq.prompt_len  # invariant: num_cached == len(token_ids) - 1
        assert seq.num_cached == len(seq.token_ids) - 1
        self.seqs[seq.rid] = seq

    def remove(self, rid: str) -> DecodeSeq | None:
        return self.seqs.pop(rid, None)

    def has_room(self, seq: DecodeSeq, extra: int = 0) -> bool:
        """Ensure slots up to position num_cached + extra (what this step writes); grow page by page."""
        while seq.num_cached + extra >= len(seq.page_ids) * self.page_size:
            more = self.pages.alloc_for(seq.rid, 1)
            if more is None:
                return False
            seq.page_ids.extend(more)
        return True

    def schedule(self, pending: dict[str, int] | None = None) -> tuple[list[DecodeSeq], DecodeSeq | None]:
        """(this step's sequences, a request to fail when all are stalled, else None).

        pending: rid -> row of the step still in flight (overlap loop); such a sequence has one more
        token on the way, so this step writes position num_cached + 1. One whose in-flight token is
        its last by length sits out (known now; an EOS is only known after, and costs one row). With
        a step in flight no request is failed: its results may finish some and free pages."""
        pending = pending or {}
        batch = []
        for s in self.seqs.values():
            p = 1 if s.rid in pending else 0
            if p and s.num_output + 1 >= s.sampling.max_new_tokens:
                continue
            if self.has_room(s, p):
                batch.append(s)
        if not batch and self.seqs and not pending:
            return [], next(reversed(self.seqs.values()))
        return batch, None

    def plan_for(self, batch: list[DecodeSeq], pending: dict[str, int] | None = None) -> StepPlan:
        """DECODE plan: each sequence feeds its last token at position num_cached, or with a token
        in flight (pending) that token, by its row in the previous step, at num_cached + 1."""
        pending = pending or {}
        rows = [pending.get(s.rid, -1) for s in batch]
        return StepPlan(mode="decode", seqs=[
            seq_plan([s.token_ids[-1]], s.num_cached + (r >= 0), s.page_ids) for s, r in zip(batch, rows)
        ], prev_rows=pack_ids(rows) if pending else b"")

    def commit(self, seq: DecodeSeq, new_ids: list[int]) -> None:
        """After the forward: the fed token is cached; append the accepted new tokens."""
        seq.num_cached += 1
        seq.token_ids.extend(new_ids)
