"""MTP speculative decoding step of the decode worker leader (--mtp_step K; any TP: the DRAFT
input hidden states are broadcast to the followers by `Engine.run`).

Per running request the state is `mtp_rows`: the (position, token) rows whose MTP-layer KV is not
written yet, with `mtp_hidden` [k, H] the target's post-norm hidden at those positions. A step:
1. DRAFT: the MTP layer over every pending row (writes their MTP KV); the last row's argmax is
   the draft d_1 for position n + 1 (n = num_cached, x_n = the last token, not cached yet);
   d_2 .. d_K chain the MTP layer on its own output.
2. VERIFY: the target over [x_n, d_1 .. d_K] at positions n .. n + K, logits at every row.
3. Accept (spec §3.3, shared.runner.spec_decode.verify_requests): greedy requests keep d_{j+1}
   while it equals the target's (penalised) argmax t_j and emit the accepted drafts plus the next
   target token; temperature > 0 requests run rejection sampling with q one-hot at each greedy
   draft (accept with prob p_j(d), resample the residual on rejection, bonus from p_K), so every
   request's output follows the target distribution exactly. KV written past the accepted
   positions is stale; later steps overwrite it (rollback = not counting it; pages stay with the request).
A request with no room for K more tokens this step feeds only x_n (k = 0: plain sampling).
"""

from __future__ import annotations

import torch

from glmserve.shared.protocol import SamplingParams
from glmserve.shared.worker_common.plan import StepPlan, seq_plan
from glmserve.shared.runner.spec_decode import verify_requests
from glmserve.shared.worker_common.sampling import Sampled
from glmserve.decode_worker.state import DecodeSeq


def plain_greedy(s: SamplingParams) -> bool:
    return (s.temperature == 0 and s.repetition_penalty == 1.0 and s.frequency_penalty == 0
            and s.presence_penalty == 0 and not s.logprobs)


def seed_rows(seq: DecodeSeq) -> None:
    """On joining: the last prompt row (h_{P-1} from the prefill, x_P = the first token)."""
    seq.mtp_rows = [(seq.num_cached - 1, seq.token_ids[-1])]
    seq.mtp_hidden = seq.hidden[None, :]


def _first_pass(batch: list[DecodeSeq], k: int, pad: bool) -> tuple[list, torch.Tensor, list[int]]:
    """(seq plans, prev hidden [rows, H] of the pass, row of each request's last pending row in it).

    pad: every request gets exactly k + 1 rows (the shape the DRAFT graphs were captured for): its
    pending rows, then copies of the last one at the next positions. Those extra rows write MTP KV at
    positions past the last pending row, inside the request's pages (it has room for k more tokens);
    nothing reads a position before the row that owns it rewrites it (the chained drafts and the next
    step's pending rows), the same argument that makes rejected drafts' KV harmless.
    The hidden rows are one cat and (when padding) one gather: no per-request device ops."""
    plans, src, last, r0, s0 = [], [], [], 0, 0
    for s in batch:
        n = len(s.mtp_rows)
        extra = k + 1 - n if pad else 0
        ids = [t for _, t in s.mtp_rows] + [s.mtp_rows[-1][1]] * extra
        plans.append(seq_plan(ids, s.mtp_rows[0][0], s.page_ids, logits_row=n - 1 if extra else -1))
        src.extend(list(range(s0, s0 + n)) + [s0 + n - 1] * extra)  # row of the cat feeding each pass row
        last.append(r0 + n - 1)
        r0, s0 = r0 + n + extra, s0 + n
    hidden = torch.cat([s.mtp_hidden for s in batch])  # [sum n, H] the pending rows' target hidden
    if pad:
        hidden = hidden[torch.tensor(src, dtype=torch.int64).to(hidden.device)]
    return plans, hidden, last


def draft(engine, batch: list[DecodeSeq], link_ops, k: int, use: list[bool] | None = None,
          chain_normed: bool = False) -> list[list[int]]:
    """k greedy drafts per request. The first MTP pass covers every pending row (writing their MTP
    KV); each further draft chains one row: position + 1, input = the previous draft, prev hidden =
    the MTP block's own output there (vLLM's chaining for one MTP layer, spec §3.2; `vanilla_with_att`)
    or with chain_normed that output after shared_head.norm (SGLang's EAGLE; `eagle_with_att`). Only requests
    with use[i] (pages for K more tokens) chain; the others get one draft they will not feed.
    With DRAFT graphs of k + 1 rows and room everywhere, the first pass is padded to that shape."""
    from glmserve.shared.runner.batch import ForwardMode

    pad = (ForwardMode.DRAFT, k + 1) in engine.runner.graph_sets and use is not None and all(use)
    plans, hidden, last_rows = _first_pass(batch, k, pad)
    out = engine.lead(StepPlan(mode="draft", link_ops=link_ops, seqs=plans), prev_hidden=hidden.to(engine.device))
    drafts = [[d] for d in out.logits.argmax(-1).tolist()]
    last = torch.tensor(last_rows)
    chain = [i for i in range(len(batch)) if use is None or use[i]]
    z = out.hidden[last[chain].to(out.hidden.device)]  # [B', H] MTP output at each chaining request's last row
    for j in range(1, k if chain else 1):
        if chain_normed:
            with torch.inference_mode():
                z = engine.runner.model.mtp_head_norm(z)
        plan = StepPlan(mode="draft", seqs=[
            seq_plan([drafts[i][-1]], batch[i].mtp_rows[-1][0] + j, batch[i].page_ids) for i in chain
        ])
        out = engine.lead(plan, prev_hidden=z)
        z = out.hidden
        for i, t in zip(chain, out.logits.argmax(-1).tolist()):
            drafts[i].append(t)
    return drafts


def release_rejected_pages(seq: DecodeSeq, pages, page_size: int, num_pages_before: int) -> list[int]:
    """Rollback's page side, after commit: pages grown this step for drafts that hold no accepted
    token (index >= what the next step needs: positions 0 .. num_cached) go back to the pool.
    Pages the request held before this step (its reservation) stay. Returns the freed ids."""
    keep = max(num_pages_before, seq.num_cached // page_size + 1)
    if keep >= len(seq.page_ids):
        return []
    freed = pages.trim(seq.rid, keep)
    assert freed == seq.page_ids[keep:], "allocator and request disagree on the page list"
    del seq.page_ids[keep:]
    return freed


def verify_and_accept(engine, batch: list[DecodeSeq], drafts: list[list[int]], use_draft: list[bool]):
    """Target forward over [x_n, d_1 .. d_k] (or [x_n]) per request, logits at every row; accept with
    shared.runner.spec_decode.verify_requests (greedy: longest agreeing prefix + the target's next
    token; temperature > 0: rejection sampling, lossless; penalties see the accepted drafts). Returns
    per request (emitted Sampled rows, their target hidden [a + 1, H])."""
    fed = [[s.token_ids[-1]] + (d if u else []) for s, d, u in zip(batch, drafts, use_draft)]
    out = engine.lead(StepPlan(mode="verify", seqs=[
        seq_plan(f, s.num_cached, s.page_ids) for s, f in zip(batch, fed)
    ]))
    verified = verify_requests(out.logits, [f[1:] for f in fed], [s.sampling for s in batch],
                               [s.token_ids for s in batch], [s.prompt_len for s in batch],
                               [s.generator for s in batch])
    results, r0 = [], 0
    for f, v in zip(fed, verified):
        rows = [Sampled(t, lp, top) for t, lp, top in zip(v.token_ids, v.logprobs, v.top_logprobs)]
        results.append((rows, out.hidden[r0 : r0 + len(rows)]))
        r0 += len(f)
    return results


def accept_greedy(fed: list[int], targets: list[int]) -> int:
    """How many target tokens a step emits: fed = [x_n, d_1 .. d_k], targets[j] = argmax at row j.
    d_{j+1} is accepted while it equals targets[j]; the emitted tokens are targets[:a + 1]."""
    a = 0
    while a + 1 < len(fed) and fed[a + 1] == targets[a]:
        a += 1
    return a + 1


def commit(seq: DecodeSeq, rows: list[Sampled], hid: torch.Tensor) -> None:
    """The fed tokens that were accepted are cached; the next pending MTP rows are theirs:
    row n + j carries (h_{n+j}, the token after it)."""
    n = seq.num_cached
    seq.num_cached += len(rows)
    seq.token_ids.extend(r.token_id for r in rows)
    seq.mtp_rows = [(n + j, rows[j].token_id) for j in range(len(rows))]
    seq.mtp_hidden = hid.detach()  # a view of this step's hidden (a fresh tensor every step): no per-request copy


def ends_early(seq: DecodeSeq, rows: list[Sampled], eos_ids: frozenset[int]) -> list[Sampled]:
    """Cut the accepted tokens after the first one that ends the request."""
    s = seq.sampling
    for j, r in enumerate(rows):
        t = r.token_id
        if (not s.ignore_eos and t in eos_ids) or t in s.stop_token_ids or seq.num_output + j + 1 >= s.max_new_tokens:
            return rows[: j + 1]
    return rows
