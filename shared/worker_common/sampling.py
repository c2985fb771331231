"""Leader-side sampling of one step's logits rows (prefill first tokens, decode next tokens).

Wraps shared.runner.sampler: builds SamplingTensors for the rows, samples, and returns plain
Python results ready for TokenEvents. Seeded requests keep one torch.Generator for life.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.sampler import SamplingTensors, make_generator, sample


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


def sample_rows(
    logits: torch.Tensor,  # [R, V] fp32, row r belongs to params[r]
    params: list[SamplingParams],
    histories: list[list[int]],  # prompt + output so far, per row
    output_starts: list[int],  # prompt length per row
    generators: list[torch.Generator | None],
) -> list[Sampled]:
    assert logits.shape[0] == len(params) == len(histories)
    tensors = SamplingTensors.from_params(params, logits.device)
    out = sample(logits.float(), tensors, histories, generators, output_starts)
    ids = out.token_ids.tolist()
    lps = out.logprobs.tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in ids]
    if out.top_logprobs is not None:
        top_ids, top_vals = out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist()
        for r, p in enumerate(params):
            k = p.top_logprobs if p.logprobs else 0
            tops[r] = list(zip(top_ids[r][:k], top_vals[r][:k]))
    return [Sampled(int(t), float(lp), top) for t, lp, top in zip(ids, lps, tops)]
