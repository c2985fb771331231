"""Per-request state on the decode worker leader.

Life of a request here (states only move forward):
  RESERVED   pages reserved on Reserve; waiting for KVChunkReady announcements
  RECEIVING  some KV pushes announced; recvs posted on the KV link
  RUNNING    last push announced, every recv completed, FirstToken arrived; in the running batch
  DONE       finished, aborted or failed; pages released exactly once (by `release`)

Token accounting: `token_ids` = prompt + output; the first output token came from the
prefill worker, which already sent it to the router, so it is never sent again here.
`num_cached` tokens have KV in this worker's cache: prompt_len after the handoff; then each
decode step caches the previous last token. Invariant while RUNNING:
  num_cached == len(token_ids) - 1 and len(page_ids) * page_size >= len(token_ids).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.worker_common.sampling import PendingSample


class Phase(enum.IntEnum):
    RESERVED = 0
    RECEIVING = 1
    RUNNING = 2
    DONE = 3


@dataclass
class DecodeSeq:
    rid: str
    prompt_len: int
    token_ids: list[int]  # prompt + output
    sampling: SamplingParams
    page_ids: list[int]
    prefill_id: str
    deadline: float  # monotonic; the handoff must complete by then
    phase: Phase = Phase.RESERVED
    num_cached: int = 0
    pending_xfers: set[str] = field(default_factory=set)
    last_announced: bool = False
    has_first: bool = False  # FirstToken arrived (token_ids ends with it)
    first_finished: bool = False  # the prefill's first token ended it
    aborted: bool = False
    generator: torch.Generator | None = None
    hidden: torch.Tensor | None = None  # [hidden] final hidden state of the prompt's last token (MTP seed)
    next_chunk: int = 0  # expected chunk_index of the next KVChunkReady
    # MTP (decode_worker/mtp.py): pending (position, token) rows and their target hidden [k, H]
    mtp_rows: list[tuple[int, int]] = field(default_factory=list)
    mtp_hidden: torch.Tensor | None = None

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def advance(self, phase: Phase) -> None:
        assert phase >= self.phase, f"{self.rid}: state {self.phase.name} -> {phase.name} goes back"
        self.phase = phase

    def handoff_complete(self) -> bool:
        """Every push announced and received, and the first token known (not needed once aborted)."""
        return self.last_announced and not self.pending_xfers and (self.has_first or self.aborted)

    def expired(self, now: float | None = None) -> bool:
        return self.phase < Phase.RUNNING and (now or time.monotonic()) > self.deadline


def finish_reason(seq: DecodeSeq, eos_ids: frozenset[int]) -> str | None:
    """Why the request ends after its newest token (None: go on). max_new_tokens counts the first token."""
    s = seq.sampling
    last = seq.token_ids[-1]
    if not s.ignore_eos and last in eos_ids:
        return "stop"
    if last in s.stop_token_ids:
        return "stop"
    if seq.num_output >= s.max_new_tokens:
        return "length"
    return None


@dataclass
class InFlight:
    """A launched DECODE step whose sampled tokens are not read back yet (the overlap loop)."""

    seqs: list[DecodeSeq]  # row i of the step is seqs[i]
    rows: dict[str, int]  # rid -> row
    sampled: PendingSample
    release_after: list[str] = field(default_factory=list)  # rids whose pages free once the step has run
