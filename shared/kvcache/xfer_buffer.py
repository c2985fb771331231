"""Wire format of one KV-link transfer (both ends of every link; used by pg_link).

One contiguous uint8 buffer per transfer:

    [0:8)   int64 little-endian: blake2b-64 hash of the transfer id
    [8:16)  int64: payload bytes
    [16:)   payload: for pages [num_layers, num_parts, n, page_size, heads, dim] in the cache
            dtype, pages in the order the caller listed them; for a tensor its bytes (C order)

The receiver checks the header before it writes anything: a transfer posted out of order (or of
another size) is detected instead of scattering someone else's KV into this request's pages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from glmserve.shared.kvcache.cache import PagedKVCache

HEADER_BYTES = 16  # keeps the payload 16-byte aligned for any dtype view


def xfer_hash(xfer_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(xfer_id.encode(), digest_size=8).digest(), "little", signed=True)


def new_send_buffer(xfer_id: str, nbytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [HEADER_BYTES + nbytes] with the header written, the host header it was copied from).

    On CUDA the header is copied from pinned memory without a host sync (a pageable copy would
    wait for the whole current stream); the caller keeps the returned host tensor alive until
    the copy ran (the transfer completed)."""
    buf = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=device)
    header = torch.tensor([xfer_hash(xfer_id), nbytes], dtype=torch.int64)
    if buf.is_cuda:
        header = header.pin_memory()
    buf[:HEADER_BYTES].copy_(header.view(torch.uint8), non_blocking=buf.is_cuda)
    return buf, header


def gather_pages(cache: PagedKVCache, ids: torch.Tensor, buf: torch.Tensor) -> None:
    """Every layer's pages `ids` into buf's payload: [num_layers, num_parts, n, page_size, heads, dim]."""
    _copy_pages(cache, ids, payload_view(buf, cache.buffer.dtype, pages_shape(cache, ids.numel())), scatter=False)


def scatter_pages(cache: PagedKVCache, ids: torch.Tensor, payload: torch.Tensor) -> None:
    """The inverse of gather_pages: payload (uint8 bytes of the pages) into pages `ids`."""
    data = payload.view(cache.buffer.dtype).view(pages_shape(cache, ids.numel()))
    _copy_pages(cache, ids, data, scatter=True)


def _copy_pages(cache: PagedKVCache, ids: torch.Tensor, packed: torch.Tensor, scatter: bool) -> None:
    """pages `ids` of the cache -> packed (or back when scatter). CUDA: the Triton page copy
    (kernels/kv_pages.py, ~0.96 of HBM copy bandwidth; torch's index_select on dim 2 reached ~0.4);
    CPU: index_select / index_copy_, the reference it is tested against."""
    if cache.buffer.is_cuda:
        from glmserve.kernels.kv_pages import copy_pages
        copy_pages(cache.buffer, ids, packed, scatter)
    elif scatter:
        cache.buffer.index_copy_(2, ids, packed)
    else:
        torch.index_select(cache.buffer, 2, ids, out=packed)


def as_page_ids(page_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = page_ids if isinstance(page_ids, torch.Tensor) else torch.tensor(list(page_ids), dtype=torch.int64)
    if device.type == "cuda" and t.device.type == "cpu":
        # pinned + non_blocking: a pageable copy would wait for the whole current stream
        return t.to(dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=torch.int64)


def pages_shape(cache: PagedKVCache, n: int) -> tuple[int, ...]:
    b = cache.buffer.shape
    return (b[0], b[1], n, b[3], b[4], b[5])


def payload_view(buf: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    return buf[HEADER_BYTES:].view(dtype).view(shape)


def check_header(xfer_id: str, nbytes: int, header: torch.Tensor) -> str:
    """"" when the received header names this transfer and size, else what went wrong."""
    got_hash, got_bytes = (int(v) for v in header.tolist())
    if got_hash != xfer_hash(xfer_id) or got_bytes != nbytes:
        return (f"recv {xfer_id!r} ({nbytes} bytes) got another transfer ({got_bytes} bytes): "
                "the two ends posted different orders or sizes")
    return ""
