"""Prefill admission and chunking (prefill worker leader; pure Python, no torch).

Requests wait FIFO. Each step takes prompt chunks under a token budget (`--chunked_prefill_size`),
several prompts per step: first the prompts already started (oldest first), then new ones while
budget and pages last. A prompt is admitted only when its own pages (the whole prompt) can be
allocated, so an admitted prompt always finishes; FIFO order is kept (no overtaking), so a large
prompt is never starved.

Invariants:
- 0 <= num_done <= prompt_len; a step advances each scheduled sequence by its chunk length.
- page_ids (this worker's pages) cover the whole prompt from admission until `finish`.
- decode_page_ids[j] is the decode-side page that receives this side's page_ids[j].
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Protocol

from glmserve.shared.protocol import SamplingParams


class Pages(Protocol):
    """What the scheduler needs of the page allocator (shared.kvcache.PageAllocator)."""

    def alloc_for(self, rid: str, n: int) -> list[int] | None: ...
    def release(self, rid: str) -> int: ...


def pages_for(num_tokens: int, page_size: int) -> int:
    return (num_tokens + page_size - 1) // page_size


@dataclass
class PrefillSeq:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    decode_id: str
    decode_page_ids: list[int]
    page_ids: list[int] = field(default_factory=list)
    num_done: int = 0  # prompt tokens whose KV is in this worker's cache
    num_pushed_pages: int = 0  # pages announced to the decode so far
    num_chunks_pushed: int = 0  # KVChunkReady messages sent (= next chunk_index)
    aborted: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.num_done == self.prompt_len


@dataclass(frozen=True)
class Chunk:
    seq: PrefillSeq
    start: int  # first prompt position of the chunk
    length: int

    @property
    def is_last(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


class PrefillScheduler:
    def __init__(self, pages: Pages, page_size: int, token_budget: int, max_seqs_per_step: int = 64):
        assert token_budget > 0
        self.pages = pages
        self.page_size = page_size
        self.token_budget = token_budget
        self.max_seqs_per_step = max_seqs_per_step
        self.waiting: collections.deque[PrefillSeq] = collections.deque()
        self.started: dict[str, PrefillSeq] = {}  # admitted, num_done < prompt_len (insertion = age)

    def add(self, seq: PrefillSeq) -> None:
        if len(seq.decode_page_ids) < pages_for(seq.prompt_len, self.page_size):
            raise ValueError(f"{seq.rid}: decode reserved {len(seq.decode_page_ids)} pages, "
                             f"prompt of {seq.prompt_len} tokens needs more")
        self.waiting.append(seq)

    def abort(self, rid: str) -> PrefillSeq | None:
        """Remove a not-yet-finished prompt; the caller frees its pages once its sends are done."""
        for seq in self.waiting:
            if seq.rid == rid:
                self.waiting.remove(seq)
                seq.aborted = True
                return seq
        seq = self.started.pop(rid, None)
        if seq is not None:
            seq.aborted = True
        return seq

    def has(self, rid: str) -> bool:
        return rid in self.started or any(s.rid == rid for s in self.waiting)

    def queued_tokens(self) -> int:
        return sum(s.prompt_len for s in self.waiting) + sum(s.prompt_len - s.num_done for s in self.started.values())

    def num_queued(self) -> int:
        return len(self.waiting) + len(self.started)

    def schedule(self) -> list[Chunk]:
        """This step's chunks; advances num_done (the caller runs exactly these chunks)."""
        budget = self.token_budget
        chunks: list[Chunk] = []
        for seq in list(self.started.values()):
            if budget == 0 or len(chunks) == self.max_seqs_per_step:
                break
            budget -= self._take(seq, budget, chunks)
        while self.waiting and budget > 0 and len(chunks) < self.max_seqs_per_step:
            seq = self.waiting[0]
            pages = self.pages.alloc_for(seq.rid, pages_for(seq.prompt_len, self.page_size))
            if pages is None:
                break  # FIFO: wait for pages rather than let smaller prompts overtake
            self.waiting.popleft()
            seq.page_ids = pages
            self.started[seq.rid] = seq
            budget -= self._take(seq, budget, chunks)
        return chunks

    def _take(self, seq: PrefillSeq, budget: int, chunks: list[Chunk]) -> int:
        n = min(budget, seq.prompt_len - seq.num_done)
        chunks.append(Chunk(seq, seq.num_done, n))
        seq.num_done += n
        if seq.done:
            del self.started[seq.rid]
        return n
