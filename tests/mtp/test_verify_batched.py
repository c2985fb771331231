"""shared.runner.spec_decode: the batched greedy verify (`verify_greedy_batched`, taken by every plain
greedy request) equals the per-request loop (`verify_requests_loop`) token for token, logprob for
logprob, on random logits with drafts that agree for a random prefix, mixed k_b (0 .. K) and
top_logprobs; a batch mixing greedy, penalised greedy and seeded sampled requests equals the loop."""

from __future__ import annotations

import random

import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.sampler import make_generator
from glmserve.shared.runner.spec_decode import plain_greedy, verify_requests, verify_requests_loop

V = 40


def _case(rng: random.Random, gen: torch.Generator, params: list[SamplingParams], k: int):
    """Random logits; request b drafts k_b tokens, the first few equal its rows' argmax."""
    lens = [1 + rng.randint(0, k) for _ in params]
    logits = torch.randn(sum(lens), V, generator=gen) * 2
    top = logits.argmax(-1).tolist()
    drafts, r0 = [], 0
    for n in lens:
        ok = rng.randint(0, n - 1)
        drafts.append([top[r0 + j] if j < ok else (top[r0 + j] + 1 + rng.randrange(V - 1)) % V for j in range(n - 1)])
        r0 += n
    hists = [[rng.randrange(V) for _ in range(rng.randint(1, 6))] for _ in params]
    return logits, drafts, hists, [1] * len(params)


def test_batched_greedy_equals_loop_on_random_inputs():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for trial in range(40):
        params = [SamplingParams(temperature=0.0, logprobs=rng.random() < 0.3, top_logprobs=rng.randint(0, 3))
                  for _ in range(rng.randint(1, 9))]
        logits, drafts, hists, starts = _case(rng, gen, params, k=rng.randint(0, 4))
        got = verify_requests(logits, drafts, params, hists, starts, [None] * len(params))
        want = verify_requests_loop(logits, drafts, params, hists, starts, [None] * len(params))
        assert got == want, f"trial {trial}"
    assert sum(len(v.token_ids) for v in got) >= len(got)  # at least one token per request


def test_accepts_only_the_agreeing_prefix():
    logits = torch.full((5, V), -5.0)
    for r, t in enumerate([7, 8, 9, 3, 4]):
        logits[r, t] = 5.0
    greedy = SamplingParams(temperature=0.0)
    # request 0: x_n + drafts [7, 8] (both right) -> 7, 8, 9; request 1: drafts [5] (wrong) -> 4? no: row 3 -> 3
    got = verify_requests(logits, [[7, 8], [5]], [greedy, greedy], [[1], [1]], [1, 1], [None, None])
    assert [v.token_ids for v in got] == [[7, 8, 9], [3]]


def test_mixed_batch_equals_loop():
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.4),
             SamplingParams(temperature=0.8, top_k=5, seed=3), SamplingParams(temperature=0.0, logprobs=True,
                                                                              top_logprobs=2)]
    for trial in range(20):
        params = [rng.choice(kinds) for _ in range(rng.randint(2, 8))]
        logits, drafts, hists, starts = _case(rng, gen, params, k=3)
        gens = lambda: [make_generator(p.seed) if p.seed is not None else None for p in params]  # noqa: E731
        got = verify_requests(logits, drafts, params, hists, starts, gens())
        want = verify_requests_loop(logits, drafts, params, hists, starts, gens())
        assert got == want, f"trial {trial}"
    assert plain_greedy(kinds[0]) and plain_greedy(kinds[3]) and not plain_greedy(kinds[1])
