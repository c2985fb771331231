"""One generation run (one choice) as the router tracks it, and what it hands the endpoint.

Runs in the router process. A `Run` moves forward only:
QUEUED -> RESERVING (Reserve sent to a decode) -> RUNNING (PrefillRequest sent) -> DONE.
A re-run (worker lost or retryable error before any token) goes back to QUEUED under a new
rid (`<base>.<attempt>`), so stale events of the old attempt are recognized and dropped.
The endpoint reads `Chunk`s (or one `Failure`) from `run.queue` until `finished`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from glmserve.router.errors import APIError
from glmserve.shared.protocol import SamplingParams


class Phase(enum.Enum):
    QUEUED = 1
    RESERVING = 2
    RUNNING = 3
    DONE = 4


@dataclass(frozen=True)
class Chunk:
    """New tokens of one run; `finish_reason` set on the last chunk."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"


@dataclass(frozen=True)
class Failure:
    error: APIError


@dataclass(eq=False)  # identity equality: runs are found in the queue by identity
class Run:
    base_rid: str
    prompt_ids: list[int]
    prompt_bytes: bytes  # packed int32 of prompt_ids
    sampling: SamplingParams
    created: float = field(default_factory=time.monotonic)
    attempt: int = 0
    phase: Phase = Phase.QUEUED
    decode_id: str | None = None
    prefill_id: str | None = None
    prefill_done: bool = False  # the prefill sent its token: its death no longer matters
    deadline: float = 0.0  # of the current waiting state (RESERVING)
    tried_decodes: set[str] = field(default_factory=set)  # said Busy (cleared when all did)
    failed_workers: set[str] = field(default_factory=set)  # avoided on re-runs while others are ready
    num_tokens: int = 0  # tokens delivered to the endpoint
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def rid(self) -> str:
        return f"{self.base_rid}.{self.attempt}"

    def workers(self) -> list[str]:
        return [w for w in (self.prefill_id, self.decode_id) if w is not None]
