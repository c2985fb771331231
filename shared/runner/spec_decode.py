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


class Verified(NamedTuple):
    token_ids: list[int]  # accepted drafts then the target's token (1 .. k + 1 ids)
    logprobs: list[float]  # of each emitted token under the processed target distribution of its row
    top_logprobs: list[list[tuple[int, float]]]  # per emitted token (empty unless asked)


def _request_noise(k: int, vocab: int, gen: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniforms [k], exponentials [V]) for one request: from its own generator when seeded (drawn on
    the generator's device, uniforms first, like the sampler's V draws per step), else the global RNG."""
    dev = gen.device if gen is not None else device
    u = torch.rand(k, generator=gen, device=dev)
    e = torch.empty(vocab, device=dev).exponential_(generator=gen)
    return u.to(device), e.to(device)


def plain_greedy(p) -> bool:
    """Greedy with no penalties: the target's choice at a row is argmax(logits), whatever the history."""
    return (p.temperature <= 0 and p.repetition_penalty == 1.0 and p.frequency_penalty == 0
            and p.presence_penalty == 0)


def verify_requests(
    logits: torch.Tensor,  # [R, V] fp32: the VERIFY rows of every request, in order (k_b + 1 rows each)
    drafts: list[list[int]],  # k_b greedy drafts per request (k_b may be 0: the request fed only x_n)
    params: list,  # shared.protocol.SamplingParams per request
    histories: list[list[int]],  # prompt + output so far per request (before this step)
    output_starts: list[int],  # prompt length per request
    generators: list[torch.Generator | None],
) -> list[Verified]:
    """Accept/reject every request of one VERIFY forward.

    Plain greedy requests (`plain_greedy`) go through `verify_greedy_batched`: one batched argmax,
    compare and cumprod for all of them, one host copy. The others (sampled, or penalised greedy) go
    through `verify_requests_loop`, request by request. Both give the same tokens and logprobs."""
    lens = [len(d) + 1 for d in drafts]
    assert sum(lens) == logits.shape[0]
    fast = [plain_greedy(p) for p in params]
    if all(fast):
        return verify_greedy_batched(logits, drafts, params)
    if not any(fast):
        return verify_requests_loop(logits, drafts, params, histories, output_starts, generators)
    starts = [sum(lens[:b]) for b in range(len(lens))]
    groups: dict[bool, list[int]] = {True: [], False: []}
    for b, f in enumerate(fast):
        groups[f].append(b)
    rows = {f: torch.tensor([r for b in bs for r in range(starts[b], starts[b] + lens[b])], dtype=torch.int64,
                            device=logits.device) for f, bs in groups.items()}
    pick = lambda xs, f: [xs[b] for b in groups[f]]  # noqa: E731
    got = {True: verify_greedy_batched(logits[rows[True]], pick(drafts, True), pick(params, True)),
           False: verify_requests_loop(logits[rows[False]], pick(drafts, False), pick(params, False),
                                       pick(histories, False), pick(output_starts, False), pick(generators, False))}
    out: list[Verified | None] = [None] * len(params)
    for f, bs in groups.items():
        for b, v in zip(bs, got[f]):
            out[b] = v
    return out  # type: ignore[return-value]


def verify_greedy_batched(logits: torch.Tensor, drafts: list[list[int]], params: list) -> list[Verified]:
    """`accept_greedy` for requests that are all `plain_greedy`, with k_b drafts each (k_b may differ).

    Rows are gathered into [B, K + 1] (K = max k_b; request b repeats its last row past k_b + 1, and its
    drafts are padded with -1, which never equals an argmax, so n_b <= k_b). Logprobs are those of
    log_softmax(logits) (temperature read as 1, as the sampler does for greedy rows)."""
    lens = [len(d) + 1 for d in drafts]
    k, dev = max(lens) - 1, logits.device
    starts = [sum(lens[:b]) for b in range(len(lens))]
    idx = torch.tensor([[r0 + min(j, n - 1) for j in range(k + 1)] for r0, n in zip(starts, lens)],
                       dtype=torch.int64).to(dev)  # [B, K + 1] verify row of (request, position)
    draft_ids = torch.tensor([d + [-1] * (k - len(d)) for d in drafts], dtype=torch.int64).view(len(lens), k).to(dev)
    logp = logits.float().log_softmax(-1)  # [R, V]
    targets = logits.float().argmax(-1)[idx]  # [B, K + 1]
    acc = accept_greedy(draft_ids, targets)
    # the emitted tokens are targets[b, :n_b + 1] (accepted drafts equal their row's argmax)
    lps = logp[idx, targets]  # [B, K + 1]
    k_top = max((p.top_logprobs for p in params if p.logprobs), default=0)
    top = logp.topk(min(k_top, logp.shape[1]), dim=-1) if k_top else None
    host = torch.cat([acc.num_accepted[:, None], targets], 1).tolist()  # the one sync of the step
    lps_host = lps.tolist()
    top_vals, top_ids = (top[0].tolist(), top[1].tolist()) if top is not None else ([], [])
    out = []
    for b, (row, p) in enumerate(zip(host, params)):
        n = row[0]
        kb = p.top_logprobs if p.logprobs else 0
        tops = [list(zip(top_ids[starts[b] + j][:kb], top_vals[starts[b] + j][:kb])) if kb else []
                for j in range(n + 1)]
        out.append(Verified(row[1 : n + 2], lps_host[b][: n + 1], tops))
    return out


def verify_requests_loop(
    logits: torch.Tensor, drafts: list[list[int]], params: list, histories: list[list[int]],
    output_starts: list[int], generators: list[torch.Generator | None],
) -> list[Verified]:
    """Any requests (arguments as `verify_requests`), one at a time.


    Row j of request b is scored with the history extended by its first j drafts (so repetition,
    frequency and presence penalties see exactly what plain decoding would), turned into the
    sampler's distribution P' (one-hot at the penalised argmax for temperature 0, truncated and
    tempered otherwise), then `accept_rejection` with q one-hot at each (greedy) draft."""
    from glmserve.shared.runner.sampler import SamplingTensors, apply_penalties, sampling_probs

    lens = [len(d) + 1 for d in drafts]
    row_params = [p for p, n in zip(params, lens) for _ in range(n)]
    row_hist = [h + d[:j] for h, d, n in zip(histories, drafts, lens) for j in range(n)]
    row_starts = [s for s, n in zip(output_starts, lens) for _ in range(n)]
    t = SamplingTensors.from_params(row_params, logits.device)
    probs = sampling_probs(logits, t, row_hist, row_starts)  # [R, V]
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    logp = (apply_penalties(logits, t, row_hist, row_starts) / temp[:, None]).log_softmax(-1).cpu()
    out, r0, vocab = [], 0, logits.shape[1]
    for b, (d, n) in enumerate(zip(drafts, lens)):
        greedy = params[b].temperature <= 0  # no draws: a seeded greedy request's generator stays untouched
        u, e = _request_noise(n - 1, vocab, None if greedy else generators[b], probs.device)
        acc = accept_rejection(torch.tensor([d], dtype=torch.int64, device=logits.device).view(1, n - 1),
                               probs[r0 : r0 + n][None], u[None], e[None])
        ids = acc.token_ids[0, : int(acc.num_accepted[0]) + 1].tolist()
        lps = [float(logp[r0 + j, v]) for j, v in enumerate(ids)]
        k_top = params[b].top_logprobs if params[b].logprobs else 0
        tops = []
        for j in range(len(ids)):
            vals, top_ids = logp[r0 + j].topk(min(k_top, vocab)) if k_top else (torch.empty(0), torch.empty(0))
            tops.append(list(zip(top_ids.tolist(), vals.tolist())))
        out.append(Verified(ids, lps, tops))
        r0 += n
    return out
