"""Leader-side sampling of one step's logits rows (prefill first tokens, decode next tokens).

Wraps shared.runner.sampler: builds SamplingTensors for the rows, samples, and returns plain
Python results ready for TokenEvents. Seeded requests keep one torch.Generator for life.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.shared.kvcache.cuda_wait import MIN_SLEEP_S, wait_event
from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.sampler import SampleOutput, SamplingTensors, make_generator, sample


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob) pairs when top_logprobs was asked, else []


def generator_for(params: SamplingParams, vocab_size: int = 0, draws_done: int = 0,
                  device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's generator, advanced past `draws_done` sampling steps made elsewhere.

    The decode worker continues a seeded request whose first token the prefill sampled: the
    sampler draws vocab_size Exp(1) numbers per non-greedy step, so skipping one such draw makes
    the fleet's seeded output equal a single process's (shared.generate) for the same seed.
    The generator lives on the logits' device (the sampler draws there)."""
    if params.seed is None:
        return None
    g = make_generator(params.seed, device)
    if params.temperature > 0:
        for _ in range(draws_done):
            torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=g)
    return g


class PendingSample:
    """One step's sampled rows on their way to the host.

    `ids` [R] int64 stays on the logits' device (the overlap loop feeds it to the next step without
    a host round trip); the host copies are made non-blocking into pinned memory behind an event, so
    `rows()` waits only for this step's sampling, not for work queued after it."""

    def __init__(self, out: SampleOutput, params: list[SamplingParams]):
        self.ids = out.token_ids
        self.top_k = [p.top_logprobs if p.logprobs else 0 for p in params]
        tensors = [out.token_ids, out.logprobs, *(out.top_logprobs or ())]
        if self.ids.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tensors, None

    def rows(self) -> list[Sampled]:
        """The rows as plain Python (blocks until this step's sampling has run)."""
        if self._event is not None:
            wait_released(self._event)
        ids, lps = self._host[0].tolist(), self._host[1].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in ids]
        if len(self._host) == 4:
            top_ids, top_vals = self._host[2].tolist(), self._host[3].tolist()
            for r, k in enumerate(self.top_k):
                tops[r] = list(zip(top_ids[r][:k], top_vals[r][:k]))
        return [Sampled(int(t), float(lp), top) for t, lp, top in zip(ids, lps, tops)]


def wait_released(event: "torch.cuda.Event") -> None:
    """Wait for `event` by polling with 20 us sleeps (cuda_wait.wait_event): the waiting thread never
    holds the GIL (a blocking synchronize may keep it for the whole step, and the KV link's thread,
    which needs it to receive the next requests' pages, then stalls for as long)."""
    wait_event(event, lambda: False, max_sleep_s=MIN_SLEEP_S)


def sample_async(
    logits: torch.Tensor,  # [R, V] fp32, row r belongs to params[r]
    params: list[SamplingParams],
    histories: list[list[int]],  # prompt + output so far, per row (read only by penalties)
    output_starts: list[int],  # prompt length per row
    generators: list[torch.Generator | None],
) -> PendingSample:
    """Queue the sampling of every row; nothing here waits for the device."""
    assert logits.shape[0] == len(params) == len(histories)
    tensors = SamplingTensors.from_params(params, logits.device)
    return PendingSample(sample(logits.float(), tensors, histories, generators, output_starts), params)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
                output_starts: list[int], generators: list[torch.Generator | None]) -> list[Sampled]:
    """`sample_async(...).rows()`: sample and wait for the result."""
    return sample_async(logits, params, histories, output_starts, generators).rows()


def needs_history(params: SamplingParams) -> bool:
    """Does sampling this request read its whole token history (penalties)? The overlap loop must
    then know the previous step's token on the host before it samples the next."""
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
