"""Sampler math: greedy, distributions on a tiny vocab, truncation, penalties, seeds, logprobs."""

import math

import pytest
import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.sampler import SamplingTensors, make_generator, sample, sampling_probs


def _tensors(n: int, **kw) -> SamplingTensors:
    return SamplingTensors.from_params([SamplingParams(**kw) for _ in range(n)], "cpu")


def _empirical(logits_row: torch.Tensor, n: int, **kw) -> torch.Tensor:
    logits = logits_row[None, :].repeat(n, 1)
    out = sample(logits, _tensors(n, **kw), [[] for _ in range(n)])
    return torch.bincount(out.token_ids, minlength=logits.shape[1]).float() / n


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(5, 11)
    out = sample(logits, _tensors(5, temperature=0.0, logprobs=True, top_logprobs=3), [[]] * 5)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    ids, vals = out.top_logprobs
    torch.testing.assert_close(vals, ref.topk(3, -1).values)
    assert torch.equal(ids[:, 0], logits.argmax(-1))


def test_temperature_distribution_matches_softmax():
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    freq = _empirical(row, 40000, temperature=0.7)
    expected = (row / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.012


def test_top_k_top_p_min_p_supports():
    torch.manual_seed(1)
    row = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    p = row.softmax(-1)
    freq = _empirical(row, 20000, temperature=1.0, top_k=2)
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], p[:2] / p[:2].sum(), atol=0.015, rtol=0)
    # top_p 0.8: mass before token 0 is 0, before 1 is 0.63, before 2 is 0.87 -> keep {0, 1}
    freq = _empirical(row, 20000, temperature=1.0, top_p=0.8)
    assert freq[2:].sum() == 0 and freq[1] > 0.2
    # min_p 0.3: keep p >= 0.3 * p0 -> tokens 0 (1.0) and 1 (0.37)
    freq = _empirical(row, 20000, temperature=1.0, min_p=0.3)
    assert freq[2:].sum() == 0 and freq[1] > 0.2


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    t = _tensors(1, temperature=0.0, repetition_penalty=2.0, logprobs=True)
    hist = [[0, 1, 1]]  # token 0 positive -> /2, token 1 negative -> *2
    probs = sampling_probs(logits, SamplingTensors.from_params([SamplingParams(repetition_penalty=2.0)]), hist)
    expected = torch.tensor([[1.0, -2.0, 0.5, 1.0]]).softmax(-1)
    torch.testing.assert_close(probs, expected)
    out = sample(logits, t, hist)
    assert out.token_ids.item() in (0, 3)  # tie at 1.0 after penalty
    torch.testing.assert_close(out.logprobs, expected.log()[0, out.token_ids])


def test_frequency_presence_only_count_output_tokens():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    t = SamplingTensors.from_params([params])
    hist = [[2, 2, 3, 0, 0, 0]]  # prompt [2, 2, 3], output [0, 0, 0]
    probs = sampling_probs(logits, t, hist, output_starts=[3])
    expected = torch.tensor([[1.0 - 1.5 - 0.25, 1.0, 1.0, 1.0]]).softmax(-1)
    torch.testing.assert_close(probs, expected)


def test_seed_reproducible_across_batch_composition():
    torch.manual_seed(2)
    row = torch.randn(50)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=0.9, top_k=5)
    seq_a, seq_b = [], []
    g_a, g_b = make_generator(1234), make_generator(1234)
    for step in range(6):
        lg = row + step * 0.1
        a = sample(lg[None], SamplingTensors.from_params([seeded]), [[]], [g_a])
        batch = torch.stack([torch.randn(50), lg, torch.randn(50)])
        b = sample(batch, SamplingTensors.from_params([other, seeded, other]), [[]] * 3, [None, g_b, None])
        seq_a.append(a.token_ids.item())
        seq_b.append(b.token_ids[1].item())
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1  # it really samples


def test_mixed_greedy_and_sampled_rows():
    torch.manual_seed(3)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)] * 2
    out = sample(logits, SamplingTensors.from_params(params), [[]] * 4)
    assert torch.equal(out.token_ids, logits.argmax(-1))  # top_k=1 is argmax too
    assert torch.isfinite(out.logprobs).all()


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_logprob_reads_temperature_scaled_distribution(temp):
    logits = torch.randn(3, 17)
    out = sample(logits, _tensors(3, temperature=temp, top_k=4), [[]] * 3)
    ref = (logits / temp).log_softmax(-1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, ref)
    assert all(math.isfinite(v) for v in out.logprobs.tolist())


@pytest.mark.gpu
def test_seeded_tokens_same_on_cuda_and_cpu():
    torch.manual_seed(5)
    logits = torch.randn(3, 1000)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)]
    outs = []
    for dev in ("cpu", "cuda"):
        gens = [make_generator(p.seed) for p in params]  # CPU generators, as the workers keep them
        t = SamplingTensors.from_params(params, dev)
        outs.append([sample(logits.to(dev) + 0.01 * k, t, [[]] * 3, gens).token_ids.tolist() for k in range(4)])
    assert outs[0] == outs[1]
