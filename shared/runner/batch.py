"""The one batch type the schedulers hand to the model runner (both worker processes).

A batch is a flat list of tokens from many sequences. Every sequence contributes
`query_lens[i]` new tokens whose KV is written to `slot_mapping` and which attend
to everything the sequence already has in the paged cache plus themselves (causal).

Invariants (checked by `validate`):
- T = sum(query_lens) = len(input_ids) = len(positions) = len(slot_mapping)
- seq_lens[i] = prefix_lens[i] + query_lens[i]; positions of sequence i are
  prefix_lens[i] .. seq_lens[i]-1 (in order)
- slot = page_id * page_size + offset; slot_mapping[t] is the cache slot of token t and
  equals page_table[i, pos // page_size] * page_size + pos % page_size
- page_table rows are padded with 0 past the sequence's pages (page 0 is a real page;
  padding is never read because reads stop at seq_lens)
- logits_indices selects the rows (of the T tokens) whose logits are wanted:
  PREFILL/DECODE: last token of each sequence that wants a sample; VERIFY: all rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    PREFILL = "prefill"  # new prompt tokens (possibly one chunk of a longer prompt)
    DECODE = "decode"  # exactly one new token per sequence
    VERIFY = "verify"  # K+1 tokens per sequence (last accepted + K drafts), logits at every row
    DRAFT = "draft"  # MTP layer forward


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_lens: torch.Tensor  # [B] int32, new tokens per sequence
    prefix_lens: torch.Tensor  # [B] int32, tokens already in the cache
    seq_lens: torch.Tensor  # [B] int32 = prefix_lens + query_lens
    query_start_loc: torch.Tensor  # [B+1] int32, cumsum of query_lens starting at 0
    page_table: torch.Tensor  # [B, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [R] int64
    # host copies for schedulers and torch reference paths (avoid device syncs)
    query_lens_cpu: list[int]
    prefix_lens_cpu: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @staticmethod
    def build(
        mode: ForwardMode,
        seqs: list[tuple[list[int], int, list[int]]],
        page_size: int,
        logits_rows: str = "last",
        device: torch.device | str = "cpu",
    ) -> "ForwardBatch":
        """Build a batch from (new_token_ids, prefix_len, page_ids) per sequence.

        `page_ids` must cover prefix_len + len(new_token_ids) tokens.
        logits_rows: "last" (last token of each sequence), "all", or "none".
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        plens: list[int] = []
        logits_idx: list[int] = []
        max_pages = max((len(p) for _, _, p in seqs), default=1) or 1
        table = torch.zeros((len(seqs), max_pages), dtype=torch.int32)
        for i, (ids, prefix, pages) in enumerate(seqs):
            n = len(ids)
            assert len(pages) * page_size >= prefix + n, "page list too short for sequence"
            start = len(input_ids)
            input_ids.extend(ids)
            for pos in range(prefix, prefix + n):
                positions.append(pos)
                slots.append(pages[pos // page_size] * page_size + pos % page_size)
            qlens.append(n)
            plens.append(prefix)
            if pages:
                table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            if logits_rows == "last" and n > 0:
                logits_idx.append(start + n - 1)
            elif logits_rows == "all":
                logits_idx.extend(range(start, start + n))
        q = torch.tensor(qlens, dtype=torch.int32)
        p = torch.tensor(plens, dtype=torch.int32)
        qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(q, 0)
        dev = torch.device(device)
        return ForwardBatch(
            mode=mode,
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            query_lens=q.to(dev),
            prefix_lens=p.to(dev),
            seq_lens=(q + p).to(dev),
            query_start_loc=qsl.to(dev),
            page_table=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64, device=dev),
            query_lens_cpu=qlens,
            prefix_lens_cpu=plens,
        )

    def validate(self, page_size: int) -> None:
        """Assert the invariants in the module docstring (tests and debug builds only)."""
        t = self.num_tokens
        assert sum(self.query_lens_cpu) == t == self.positions.numel() == self.slot_mapping.numel()
        assert torch.equal(self.seq_lens, self.prefix_lens + self.query_lens)
        seq_of_token = torch.repeat_interleave(
            torch.arange(self.num_seqs, device=self.positions.device), self.query_lens.long()
        )
        pages = self.page_table.long()[seq_of_token, self.positions // page_size]
        assert torch.equal(pages * page_size + self.positions % page_size, self.slot_mapping)
