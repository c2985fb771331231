"""shared.runner.spec_decode.verify_requests: the per-request verify of one VERIFY forward equals plain
decoding where it must (greedy with penalties; no drafts with a seed) and emits only valid prefixes."""

from __future__ import annotations

import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.sampler import SamplingTensors, make_generator, sample
from glmserve.shared.runner.spec_decode import verify_requests

V = 32


def _greedy_step(logits_row, params, hist, start):
    out = sample(logits_row[None], SamplingTensors.from_params([params]), [hist], None, [start])
    return int(out.token_ids[0]), float(out.logprobs[0])


def test_greedy_with_penalties_equals_step_by_step_decoding():
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.2, logprobs=True, top_logprobs=2)
    hist, start = [3, 4, 5, 4, 9], 3
    logits = torch.randn(4, V, generator=g) * 3  # x_n + 3 drafts
    # the drafts a perfect drafter would make: plain greedy decoding with the growing history
    chain, lps = [], []
    for j in range(4):
        t, lp = _greedy_step(logits[j], params, hist + chain, start)
        chain.append(t)
        lps.append(lp)
    for n_ok in range(4):  # first n_ok drafts right, the next one wrong
        drafts = chain[:n_ok] + [(chain[n_ok] + 1) % V] * (3 - n_ok) if n_ok < 3 else chain[:3]
        got = verify_requests(logits, [drafts], [params], [hist], [start], [None])[0]
        assert got.token_ids == (chain[: n_ok + 1] if n_ok < 3 else chain)
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(lps[: len(got.token_ids)]), atol=1e-5)
        assert all(len(t) == 2 for t in got.top_logprobs)


def test_no_drafts_with_seed_equals_the_sampler():
    """k = 0 (a request that could not draft) consumes its generator exactly as plain decoding does."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.8, top_k=10, seed=s) for s in (11, 12, 13)]
    hists = [[1, 2], [3], [4, 5, 6]]
    want = sample(logits, SamplingTensors.from_params(params), hists,
                  [make_generator(p.seed) for p in params], [1, 1, 1]).token_ids.tolist()
    got = verify_requests(logits, [[], [], []], params, hists, [1, 1, 1], [make_generator(p.seed) for p in params])
    assert [v.token_ids for v in got] == [[w] for w in want]


def test_mixed_batch_prefix_and_seed_determinism():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2 + 3 + 1, V, generator=g)
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7)]
    drafts = [[7], [int(logits[2].argmax()), 1], []]
    args = (logits, drafts, params, [[1], [2], [3]], [1, 1, 1])
    a = verify_requests(*args, [make_generator(5), None, None])
    b = verify_requests(*args, [make_generator(5), None, None])
    assert a[0] == b[0]  # same seed, same result
    assert a[1].token_ids[0] == drafts[1][0] and len(a[1].token_ids) >= 2  # greedy: right draft accepted
    for v, d in zip(a, drafts):
        n = len(v.token_ids) - 1
        assert 0 <= n <= len(d) and v.token_ids[:n] == d[:n]
