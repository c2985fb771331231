"""MTP speculative decoding step of the decode worker leader (--mtp_step 1; TP 1 for now).

Per running request the state is `mtp_rows`: the (position, token) rows whose MTP-layer KV is not
written yet, with `mtp_hidden` [k, H] the target's post-norm hidden at those positions. A step:
1. DRAFT: the MTP layer over every pending row (writes their MTP KV); the last row's argmax is
   the draft d for position n + 1 (n = num_cached, x_n = the last token, not cached yet).
2. VERIFY: the target over [x_n, d] at positions n, n + 1, logits at both rows.
3. Greedy accept (spec §3.3): t0 = argmax(row 0); if d == t0 the draft is accepted and the bonus
   t1 = argmax(row 1) follows: tokens [t0, t1], both positions cached. Else tokens [t0] and the
   KV written at n + 1 is stale; the next step overwrites it (rollback = not counting it).
Requests that are not plain greedy (temperature > 0, penalties, logprobs) feed only x_n and
sample row 0 as usual, so the output never depends on the drafts: it equals plain decoding.
"""

from __future__ import annotations

import torch

from shared.protocol import SamplingParams
from shared.worker_common.plan import StepPlan, seq_plan
from shared.worker_common.sampling import Sampled, sample_rows
from decode_worker.state import DecodeSeq


def plain_greedy(s: SamplingParams) -> bool:
    return (s.temperature == 0 and s.repetition_penalty == 1.0 and s.frequency_penalty == 0
            and s.presence_penalty == 0 and not s.logprobs)


def seed_rows(seq: DecodeSeq) -> None:
    """On joining: the last prompt row (h_{P-1} from the prefill, x_P = the first token)."""
    seq.mtp_rows = [(seq.num_cached - 1, seq.token_ids[-1])]
    seq.mtp_hidden = seq.hidden[None, :]


def draft(engine, batch: list[DecodeSeq], link_ops) -> list[int]:
    """One greedy draft per request (argmax of the MTP logits at its last pending row)."""
    plan = StepPlan(mode="draft", link_ops=link_ops, seqs=[
        seq_plan([t for _, t in s.mtp_rows], s.mtp_rows[0][0], s.page_ids) for s in batch
    ])
    prev = torch.cat([s.mtp_hidden for s in batch]).to(engine.device)
    out = engine.lead(plan, prev_hidden=prev)
    return out.logits.argmax(-1).tolist()


def verify_and_accept(engine, batch: list[DecodeSeq], drafts: list[int], use_draft: list[bool]):
    """Target forward over [x_n (, d)] per request; returns per request (new tokens, Sampled rows)."""
    plan = StepPlan(mode="verify", seqs=[
        seq_plan([s.token_ids[-1]] + ([d] if u else []), s.num_cached, s.page_ids)
        for s, d, u in zip(batch, drafts, use_draft)
    ])
    out = engine.lead(plan)
    starts, r = [], 0
    for u in use_draft:
        starts.append(r)
        r += 2 if u else 1
    first = out.logits[starts]  # [B, V] row 0 of every request
    sampled = sample_rows(first, [s.sampling for s in batch], [s.token_ids for s in batch],
                          [s.prompt_len for s in batch], [s.generator for s in batch])
    results = []
    for i, (s, d, u) in enumerate(zip(batch, drafts, use_draft)):
        t0 = sampled[i].token_id
        if u and d == t0:
            t1 = int(out.logits[starts[i] + 1].argmax())
            rows = [sampled[i], Sampled(t1, 0.0, [])]
            hid = out.hidden[starts[i] : starts[i] + 2]
        else:
            rows, hid = [sampled[i]], out.hidden[starts[i] : starts[i] + 1]
        results.append((rows, hid))
    return results


def commit(seq: DecodeSeq, rows: list[Sampled], hid: torch.Tensor) -> None:
    """The fed tokens that were accepted are cached; the next pending MTP rows are theirs."""
    n = seq.num_cached
    fed = [seq.token_ids[-1]] + [r.token_id for r in rows[:-1]]  # x_n, then the accepted draft
    seq.num_cached += len(rows)
    seq.token_ids.extend(r.token_id for r in rows)
    seq.mtp_rows = [(n + k, rows[k].token_id) for k in range(len(rows))]
    seq.mtp_hidden = hid.detach().clone()
    assert len(fed) == len(rows)


def ends_early(seq: DecodeSeq, rows: list[Sampled], eos_ids: frozenset[int]) -> list[Sampled]:
    """Drop the bonus token when the accepted first one already ends the request."""
    if len(rows) < 2:
        return rows
    s, t = seq.sampling, rows[0].token_id
    if (not s.ignore_eos and t in eos_ids) or t in s.stop_token_ids or seq.num_output + 1 >= s.max_new_tokens:
        return rows[:1]
    return rows
