"""The decode running set: continuous batching with page accounting (decode worker leader).

Requests join after their handoff and leave when they finish, every step. A step takes every
running request that has a KV page for its next token: one new token per sequence (DECODE
mode; MTP's VERIFY adds K drafts per sequence here, and a CUDA-graph runner pads the batch to
a bucket — both only change `plan_for` and `commit`). A request whose next token crosses its
reserved pages grows by one page; when none is free it sits the step out ("stalled"). If every
running request is stalled, the newest one is failed to free pages (no deadlock).
"""

from __future__ import annotations

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

    def _has_room(self, seq: DecodeSeq) -> bool:
        return self.has_room(seq, 0)

    def has_room(self, seq: DecodeSeq, extra: int = 0) -> bool:
        """Ensure slots up to position num_cached + extra (what this step writes); grow page by page."""
        while seq.num_cached + extra >= len(seq.page_ids) * self.page_size:
            more = self.pages.alloc_for(seq.rid, 1)
            if more is None:
                return False
            seq.page_ids.extend(more)
        return True

    def schedule(self) -> tuple[list[DecodeSeq], DecodeSeq | None]:
        """(this step's sequences, a request to fail when all are stalled, else None)."""
        batch = [s for s in self.seqs.values() if self._has_room(s)]
        if not batch and self.seqs:
            return [], next(reversed(self.seqs.values()))
        return batch, None

    def plan_for(self, batch: list[DecodeSeq]) -> StepPlan:
        """DECODE plan: each sequence feeds its last token at position num_cached."""
        return StepPlan(mode="decode", seqs=[
            seq_plan([s.token_ids[-1]], s.num_cached, s.page_ids) for s in batch
        ])

    def commit(self, seq: DecodeSeq, new_ids: list[int]) -> None:
        """After the forward: the fed token is cached; append the accepted new tokens."""
        seq.num_cached += 1
        seq.token_ids.extend(new_ids)
