"""Paged KV cache storage, one per worker rank (prefill and decode workers).

One tensor holds every layer so a request's pages move in one gather and one send:

    buffer: [num_layers, num_parts, num_pages, page_size, local_kv_heads, entry_dim]

- glm4_moe (GQA): num_parts = 2 (k, v), local_kv_heads = kv heads on this TP rank
  (replicated when tp > kv heads), entry_dim = head_dim. K is stored after QK-norm and RoPE.
- glm4_moe_lite (MLA): num_parts = 1, local_kv_heads = 1, entry_dim = kv_lora_rank +
  qk_rope_head_dim (576 at real size): the normed latent then the roped shared key,
  identical on every TP rank.
- num_layers = num_hidden_layers (+ num MTP layers when the MTP layer runs); the MTP
  layer of index num_hidden_layers uses cache layer num_hidden_layers.

A token's slot is page_id * page_size + offset. Page ids are owned by the PageAllocator
of the same worker; this class only stores bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_parts: int
    page_size: int
    local_kv_heads: int
    entry_dim: int
    dtype: torch.dtype

    def page_bytes(self) -> int:
        """Bytes of one page across every layer and part."""
        n = self.num_layers * self.num_parts * self.page_size * self.local_kv_heads * self.entry_dim
        return n * torch.empty((), dtype=self.dtype).element_size()


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str = "cpu", shareable: bool = False):
        """shareable: another process on this host may map the buffer (the IPC KV link; on CPU
        it then lives in a named shared-memory segment, see ipc_map.py)."""
        self.layout = layout
        self.num_pages = num_pages
        shape = (layout.num_layers, layout.num_parts, num_pages, layout.page_size, layout.local_kv_heads,
                 layout.entry_dim)
        if shareable:
            from glmserve.shared.kvcache.ipc_map import alloc_shareable

            self.buffer = alloc_shareable(shape, layout.dtype, torch.device(device))
        else:
            self.buffer = torch.zeros(shape, dtype=layout.dtype, device=device)

    def layer(self, layer_id: int) -> torch.Tensor:
        """[num_parts, num_pages, page_size, local_kv_heads, entry_dim] view of one layer."""
        return self.buffer[layer_id]

    def flat_layer(self, layer_id: int) -> torch.Tensor:
        """[num_parts, num_pages * page_size, local_kv_heads, entry_dim] view: index by slot."""
        b = self.buffer[layer_id]
        return b.view(b.shape[0], -1, b.shape[3], b.shape[4])
