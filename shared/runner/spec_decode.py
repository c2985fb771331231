"""Speculative accept/reject: pure tensor functions (decode worker leader, after a VERIFY forward).

A request with K drafts x_1..x_K was verified in one target forward over K + 1 rows: row k
(k = 0..K) holds the target's distribution p_k of the token after (last accepted, x_1..x_k).
Every call emits, per request, n accepted drafts plus exactly one token of the target's own:
1 <= n + 1 <= K + 1 tokens.

Greedy (`accept_greedy`, target argmax t_k per row):
    n = the longest prefix with x_{k+1} == t_k (k < n); emitted = t_0 .. t_n.
    (The accepted drafts equal t_0..t_{n-1}, and t_n is the target's next token: either the
    correction at the first mismatch or the bonus after K matches.) Output == plain greedy decoding.

Sampling (`accept_rejection`, Leviathan et al. 2023 / Chen et al. 2023):
    for k = 0..K-1: accept x_{k+1} with probability min(1, p_k(x) / q_k(x)) (u_k < p_k(x)/q_k(x),
    u_k ~ U[0, 1)); at the first rejection k = n emit one token from the residual
    r(v) = max(p_n(v) - q_n(v), 0) / sum(...), and stop; when all K are accepted emit a bonus
    token from p_K. Each emitted token is then distributed exactly as the target's p (given the
    accepted prefix), whatever q is: P(emit v) = min(p, q)(v) + (1 - sum min(p, q)) * r(v) = p(v).
    The residual/bonus draw is an exponential race: argmax_v r(v) / E_v with E_v ~ Exp(1).

Drafts in this engine are greedy (argmax of the MTP logits, like vLLM's default and SGLang's
EAGLE with topk 1), so q_k is one-hot at x_{k+1}: `draft_probs=None` means exactly that; then
acceptance probability is p_k(x) and the residual is p_k with x zeroed. Passing real draft
probabilities [B, K, V] (sampled drafts) is supported and tested too.
Greedy rows can go through `accept_rejection` as well when their p is one-hot (the sampler's
`sampling_probs` gives one-hot rows for temperature 0): then it reduces to `accept_greedy`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Accepted(NamedTuple):
    num_accepted: torch.Tensor  # [B] int64, n = accepted drafts (0..K)
    token_ids: torch.Tensor  # [B, K + 1] int64, row b: n_b accepted drafts then 1 target token, then -1


def _leading_true(ok: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] int64 length of the all-True prefix of each row."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def _emit(draft_ids: torch.Tensor, n: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, K + 1]: draft_ids[b, :n_b], then last[b], then -1 padding."""
    b, k = draft_ids.shape
    col = torch.arange(k + 1, device=draft_ids.device)[None, :]
    padded = torch.cat([draft_ids, draft_ids.new_full((b, 1), -1)], dim=1)
    out = torch.where(col < n[:, None], padded, torch.full_like(padded, -1))
    return out.scatter(1, n[:, None], last[:, None])


def accept_greedy(draft_ids: torch.Tensor, target_ids: torch.Tensor) -> Accepted:
    """draft_ids [B, K] int64; target_ids [B, K + 1] int64 (argmax of each verify row)."""
    assert target_ids.shape[1] == draft_ids.shape[1] + 1
    n = _leading_true(draft_ids == target_ids[:, :-1])
    last = target_ids.gather(1, n[:, None]).squeeze(1)
    return Accepted(n, _emit(draft_ids, n, last))


def accept_rejection(
    draft_ids: torch.Tensor,  # [B, K] int64
    target_probs: torch.Tensor,  # [B, K + 1, V] fp32, rows sum to 1 (after penalties/temperature/top-k/p)
    uniforms: torch.Tensor,  # [B, K] fp32 in [0, 1)
    exponentials: torch.Tensor,  # [B, V] fp32 Exp(1) noise for the one residual or bonus draw
    draft_probs: torch.Tensor | None = None,  # [B, K, V] q; None = greedy drafts (q one-hot at x)
) -> Accepted:
    b, k = draft_ids.shape
    assert target_probs.shape[:2] == (b, k + 1) and uniforms.shape == (b, k)
    p_x = target_probs[:, :k].gather(2, draft_ids[:, :, None]).squeeze(2)  # [B, K]
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.gather(2, draft_ids[:, :, None]).squeeze(2)
    # u < p/q  <=>  u * q < p  (q > 0 for any drafted token; no division)
    n = _leading_true(uniforms * q_x < p_x)
    rows = torch.arange(b, device=draft_ids.device)
    p_n = target_probs[rows, n]  # [B, V]: p at the rejection row, or p_K when all accepted
    rejected = n < k
    if draft_probs is None:
        q_n = torch.zeros_like(p_n)
        x_n = draft_ids.gather(1, n.clamp(max=k - 1)[:, None]) if k > 0 else None
        if x_n is not None:
            q_n.scatter_(1, x_n, 1.0)
    else:
        pad = torch.cat([draft_probs, draft_probs.new_zeros(b, 1, draft_probs.shape[2])], dim=1)
        q_n = pad[rows, n]
    q_n = q_n * rejected[:, None]  # the bonus row draws from p itself
    resid = (p_n - q_n).clamp(min=0)
    # numerically empty residual (p == q to rounding): fall back to p, still a draw from the target
    empty = resid.sum(-1, keepdim=True) <= 0
    resid = torch.where(empty, p_n, resid)
    last = (resid / exponentials).argmax(-1)
    return Accepted(n, _emit(draft_ids, n, last))
