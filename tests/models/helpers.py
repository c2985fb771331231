"""Test helpers for the model tests: page bookkeeping and the HF reference (test process only)."""

from __future__ import annotations

import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode


class Pages:
    """Hands out pages to sequences in a scattered order so page tables are not trivially contiguous."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.free = list(range(num_pages - 1, 0, -1))  # page 0 stays unused: padding must never be read
        self.tables: dict[int, list[int]] = {}

    def ensure(self, seq: int, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.page_size < num_tokens:
            table.append(self.free.pop(0 if len(self.free) % 2 else -1))
        return table


def step(runner_forward, pages: Pages, chunks: list[tuple[int, list[int], int]], mode: ForwardMode, kv: PagedKVCache):
    """chunks: (seq id, new token ids, prefix len). Returns the runner output for the built batch."""
    seqs = [(ids, prefix, list(pages.ensure(sid, prefix + len(ids)))) for sid, ids, prefix in chunks]
    batch = ForwardBatch.build(mode, seqs, pages.page_size)
    batch.validate(pages.page_size)
    return runner_forward(batch, kv)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """Last-position logits [V] fp32 of the HF model over the whole sequence (no cache)."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
