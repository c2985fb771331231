"""The step plan a worker leader fans out to its TP followers (every rank of a worker runs it).

A plan says everything a rank needs to run the same step: the sequences of the forward batch
(new token ids, prefix length, page ids, whether logits are wanted) and the KV-link operations
to post after the forward (each rank moves its own KV shard to the peer's rank of the same
index). msgspec msgpack bytes, never pickle. Leaders build plans; `to_batch` turns one into the
runner's ForwardBatch on a device.
"""

from __future__ import annotations

import dataclasses

import msgspec
import torch

from glmserve.shared.protocol import pack_ids, unpack_ids
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.sampler import host_to_device


class SeqPlan(msgspec.Struct, array_like=True):
    token_ids: bytes  # packed int32: the new tokens of this sequence in this step
    prefix_len: int  # tokens of this sequence already in the paged cache
    page_ids: bytes  # packed int32: pages covering prefix_len + len(token_ids) tokens
    want_logits: bool = True  # logits row for the sequence's last new token
    mtp_ids: bytes = b""  # prefill with MTP: the next token of each of the first m rows (MTP layer KV)
    logits_row: int = -1  # which of this sequence's new tokens gets the logits row (-1: the last)


class LinkOp(msgspec.Struct, array_like=True):
    """One KV-link action, posted in plan order (both ends of a link post in the same order)."""

    kind: str  # "connect" | "send" | "recv" | "drain" | "close"
    peer: str  # the other worker's id
    xfer_id: str = ""
    page_ids: bytes = b""  # packed int32, this side's pages
    host: str = ""  # connect: the decode's TCPStore
    port: int = 0
    hidden_row: int = -1  # send: row of this step's hidden states to send after the pages
    generation: int = 0


class GraphSpec(msgspec.Struct, array_like=True):
    """Capture command: graphs for batch buckets up to max_batch_size, seq lens <= max_seq_len; of DECODE
    steps (tokens_per_seq 1) or of VERIFY steps with tokens_per_seq = K + 1 (MTP)."""

    max_batch_size: int
    max_seq_len: int
    tokens_per_seq: int = 1


class StepPlan(msgspec.Struct):
    mode: str  # ForwardMode value, "" = no forward this step (link ops only)
    seqs: list[SeqPlan] = []
    link_ops: list[LinkOp] = []
    stop: bool = False  # followers exit their loop
    graphs: GraphSpec | None = None  # capture DECODE CUDA graphs on every rank (decode workers, at start)
    # Overlap loop (decode): packed int32 per sequence, the row of the previous step's sampled tokens
    # that is this sequence's input (-1: its token_ids hold it). The tokens never visit the host.
    prev_rows: bytes = b""
    share_tokens: bool = False  # the leader broadcasts this step's sampled ids to the TP ranks


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(StepPlan)


def encode_plan(plan: StepPlan) -> bytes:
    return _enc.encode(plan)


def decode_plan(data: bytes) -> StepPlan:
    return _dec.decode(data)


def seq_plan(token_ids: list[int], prefix_len: int, page_ids: list[int], want_logits: bool = True,
             mtp_ids: list[int] | None = None, logits_row: int = -1) -> SeqPlan:
    return SeqPlan(pack_ids(token_ids), prefix_len, pack_ids(page_ids), want_logits, pack_ids(mtp_ids or []),
                   logits_row)


def to_batch(plan: StepPlan, page_size: int, device: torch.device | str) -> ForwardBatch:
    """ForwardBatch of the plan; logits rows only for sequences with want_logits (in order), at each
    one's logits_row (default its last token); VERIFY plans want logits at every row."""
    seqs = [(unpack_ids(s.token_ids), s.prefix_len, unpack_ids(s.page_ids)) for s in plan.seqs]
    rows = "all" if plan.mode == ForwardMode.VERIFY.value else "last"
    batch = ForwardBatch.build(ForwardMode(plan.mode), seqs, page_size, logits_rows=rows)  # on the host
    if rows == "last" and not all(s.want_logits and s.logits_row < 0 for s in plan.seqs):
        idx, start = [], 0
        for s, n in zip(plan.seqs, batch.query_lens_cpu):
            if s.want_logits:
                idx.append(start + (s.logits_row if s.logits_row >= 0 else n - 1))
            start += n
        batch.logits_indices = torch.tensor(idx, dtype=torch.int64)
    return to_device(batch, device)


_I64 = ("input_ids", "positions", "slot_mapping", "logits_indices")
_I32 = ("query_lens", "prefix_lens", "seq_lens", "query_start_loc", "page_table")


def to_device(batch: ForwardBatch, device: torch.device | str) -> ForwardBatch:
    """The host batch's tensors on `device` in two copies (int64 fields packed, int32 fields packed)
    instead of one copy each; on CUDA non-blocking, from pinned memory (no wait for the queued step). Every field is a view of its packed buffer starting on a
    16-byte boundary (segments padded to multiples of 4 elements), with the field's own shape."""
    out = {}
    for names, dtype in ((_I64, torch.int64), (_I32, torch.int32)):
        parts = [getattr(batch, n) for n in names]
        sizes = [-(-t.numel() // 4) * 4 for t in parts]
        host = torch.zeros(sum(sizes), dtype=dtype)
        offset = 0
        for t, size in zip(parts, sizes):
            host[offset : offset + t.numel()] = t.reshape(-1)
            offset += size
        dev = host_to_device(host, device)
        offset = 0
        for n, t, size in zip(names, parts, sizes):
            out[n] = dev[offset : offset + t.numel()].view(t.shape)
            offset += size
    return dataclasses.replace(batch, **out)


def prompt_mtp_batch(plan: StepPlan, page_size: int, device) -> tuple[ForwardBatch, torch.Tensor] | None:
    """DRAFT batch of a prefill plan's MTP rows and their row indices in the step's hidden [T, H].

    Row p of a prompt (p < prompt_len - 1) feeds the MTP layer (h_p, x_{p+1}); the decode writes
    the last prompt row itself (it needs the sampled first token)."""
    seqs, rows, offset = [], [], 0
    for s in plan.seqs:
        ids = unpack_ids(s.mtp_ids)
        if ids:
            seqs.append((ids, s.prefix_len, unpack_ids(s.page_ids)))
            rows.extend(range(offset, offset + len(ids)))
        offset += len(s.token_ids) // 4
    if not seqs:
        return None
    batch = to_device(ForwardBatch.build(ForwardMode.DRAFT, seqs, page_size, logits_rows="none"), device)
    return batch, host_to_device(torch.tensor(rows, dtype=torch.int64), batch.input_ids.device)
