"""shared.runner.spec_decode: greedy acceptance cases and a statistical check that rejection
sampling emits tokens distributed exactly as the target p (many samples, tiny vocabulary)."""

from __future__ import annotations

import pytest
import torch

from glmserve.shared.runner.spec_decode import accept_greedy, accept_rejection

V = 6
N = 200_000
# chi-square 0.9999 quantile for V - 1 = 5 degrees of freedom: a correct sampler fails 1 in 10^4
CHI2_LIMIT = 25.74


def _chi2(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=V).double()
    n = counts.sum()
    expected = p.double() * n
    support = expected > 0
    assert counts[~support].sum() == 0, f"emitted tokens outside p's support: {counts.tolist()} vs {p.tolist()}"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def _dist(vals: list[float]) -> torch.Tensor:
    t = torch.tensor(vals, dtype=torch.float32)
    return t / t.sum()


P_Q_PAIRS = {
    "random": (_dist([5, 1, 3, 2, 8, 1]), _dist([1, 6, 2, 2, 1, 4])),
    "disjoint": (_dist([3, 2, 1, 0, 0, 0]), _dist([0, 0, 0, 1, 5, 2])),
    "equal": (_dist([1, 2, 3, 4, 5, 6]), _dist([1, 2, 3, 4, 5, 6])),
    "p_one_hot": (_dist([0, 0, 1, 0, 0, 0]), _dist([2, 2, 2, 1, 1, 1])),
    "q_narrow": (_dist([1, 1, 1, 1, 1, 1]), _dist([0, 9, 1, 0, 0, 0])),
}


def _run(p0, p1, p2, q, k: int, sampled_drafts: bool, g: torch.Generator):
    """N independent verifications with K=k drafts; p_j is the target at row j."""
    target = torch.stack([p0, p1, p2][: k + 1])[None].expand(N, k + 1, V).contiguous()
    if sampled_drafts:
        drafts = torch.multinomial(q, N * k, replacement=True, generator=g).view(N, k)
        qs = q[None, None].expand(N, k, V).contiguous()
    else:  # greedy drafts: q one-hot at argmax
        drafts = torch.full((N, k), int(q.argmax()), dtype=torch.int64)
        qs = None
    u = torch.rand(N, k, generator=g)
    e = torch.empty(N, V).exponential_(generator=g)
    return accept_rejection(drafts, target, u, e, qs)


@pytest.mark.parametrize("sampled_drafts", [True, False], ids=["q_sampled", "q_greedy"])
@pytest.mark.parametrize("pair", list(P_Q_PAIRS))
def test_first_and_second_tokens_follow_target(pair, sampled_drafts):
    g = torch.Generator().manual_seed(1234)
    p0, q = P_Q_PAIRS[pair]
    p1 = _dist([2, 1, 1, 4, 1, 3])
    p2 = _dist([1, 1, 5, 1, 1, 1])
    out = _run(p0, p1, p2, q, 2, sampled_drafts, g)
    assert ((out.num_accepted >= 0) & (out.num_accepted <= 2)).all()
    assert _chi2(out.token_ids[:, 0], p0) < CHI2_LIMIT
    # given the first draft was accepted, the next emitted token is distributed as p1
    second = out.token_ids[out.num_accepted >= 1, 1]
    if second.numel() > 1000:
        assert _chi2(second, p1) < CHI2_LIMIT
    # emitted length is n + 1, -1 after it
    lens = (out.token_ids >= 0).sum(1)
    assert torch.equal(lens, out.num_accepted + 1)


def test_naive_resampling_fails_the_same_check():
    """Power check: resampling from p (not the residual) on rejection is biased and is caught."""
    g = torch.Generator().manual_seed(7)
    p, q = P_Q_PAIRS["random"]
    drafts = torch.multinomial(q, N, replacement=True, generator=g)
    accept = torch.rand(N, generator=g) * q[drafts] < p[drafts]
    resampled = torch.multinomial(p, N, replacement=True, generator=g)
    assert _chi2(torch.where(accept, drafts, resampled), p) > 10 * CHI2_LIMIT


def test_acceptance_rate_matches_overlap():
    """P(accept the first draft) = sum_v min(p, q)(v) for sampled drafts; = p(x) for greedy ones."""
    g = torch.Generator().manual_seed(3)
    p, q = P_Q_PAIRS["random"]
    out = _run(p, p, p, q, 1, True, g)
    rate = out.num_accepted.double().mean().item()
    assert abs(rate - torch.minimum(p, q).sum().item()) < 0.005
    out = _run(p, p, p, q, 1, False, g)
    assert abs(out.num_accepted.double().mean().item() - p[q.argmax()].item()) < 0.005


def test_disjoint_supports_never_accept_and_all_equal_always_accepts():
    g = torch.Generator().manual_seed(5)
    p, q = P_Q_PAIRS["disjoint"]
    assert int(_run(p, p, p, q, 2, True, g).num_accepted.max()) == 0
    p, q = P_Q_PAIRS["equal"]
    out = _run(p, p, p, q, 2, True, g)
    assert bool((out.num_accepted == 2).all())
    assert _chi2(out.token_ids[:, 2], p) < CHI2_LIMIT  # the bonus token comes from p_K


def test_one_hot_targets_reduce_to_greedy():
    target_ids = torch.tensor([[4, 2, 5], [4, 2, 5], [1, 1, 1]])
    drafts = torch.tensor([[4, 2], [4, 3], [0, 1]])
    probs = torch.zeros(3, 3, V).scatter_(2, target_ids[:, :, None], 1.0)
    out = accept_rejection(drafts, probs, torch.rand(3, 2), torch.empty(3, V).exponential_())
    ref = accept_greedy(drafts, target_ids)
    assert torch.equal(out.num_accepted, ref.num_accepted)
    assert torch.equal(out.token_ids, ref.token_ids)


def test_greedy_cases():
    drafts = torch.tensor([[7, 8, 9], [7, 8, 9], [7, 0, 9], [1, 8, 9]])
    target = torch.tensor([[7, 8, 9, 3], [7, 8, 5, 3], [7, 8, 9, 3], [7, 8, 9, 3]])
    out = accept_greedy(drafts, target)
    assert out.num_accepted.tolist() == [3, 2, 1, 0]
    assert out.token_ids.tolist() == [
        [7, 8, 9, 3],  # all accepted + bonus
        [7, 8, 5, -1],  # mismatch at the third draft: the target's token there
        [7, 8, -1, -1],  # a later match after a mismatch does not count
        [7, -1, -1, -1],
    ]


def test_greedy_k1_and_empty_batch():
    out = accept_greedy(torch.tensor([[5]]), torch.tensor([[5, 6]]))
    assert out.token_ids.tolist() == [[5, 6]] and out.num_accepted.tolist() == [1]
    empty = accept_greedy(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64))
    assert empty.token_ids.shape == (0, 3)
