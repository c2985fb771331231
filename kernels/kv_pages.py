"""KV page gather/scatter for the KV link (prefill worker sends, decode worker receives).

buffer: [num_layers, num_parts, num_pages, page_size, heads, dim] (shared/kvcache/cache.py).
gather_pages(buffer, ids) -> [num_layers, num_parts, n, page_size, heads, dim] contiguous (one send);
scatter_pages(buffer, ids, data) writes such a block back. One (layer, part, page) is one contiguous
run of CHUNK = page_size * heads * dim elements; program (run, b) copies BLOCK elements of run `run`.
Pure copy: bytes = 2 * n * page_bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import check, new_out


def gather_pages_ref(buffer: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    return buffer.index_select(2, page_ids.to(buffer.device)).contiguous()


def scatter_pages_ref(buffer: torch.Tensor, page_ids: torch.Tensor, data: torch.Tensor) -> None:
    buffer.index_copy_(2, page_ids.to(buffer.device), data)


@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, ids_ptr, num_pages, n, CHUNK, SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    run = tl.program_id(0).to(tl.int64)  # (layer * parts + part) * n + i
    lp, i = run // n, run % n
    page = tl.load(ids_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < CHUNK
    cache_off = (lp * num_pages + page) * CHUNK + offs
    packed_off = run * CHUNK + offs
    if SCATTER:
        tl.store(dst_ptr + cache_off, tl.load(src_ptr + packed_off, mask=m), mask=m)
    else:
        tl.store(dst_ptr + packed_off, tl.load(src_ptr + cache_off, mask=m), mask=m)


def copy_pages(buffer: torch.Tensor, page_ids: torch.Tensor, packed: torch.Tensor, scatter: bool) -> None:
    """gather (scatter=False): buffer pages -> packed; scatter: packed -> buffer pages. packed is
    [num_layers, num_parts, n, page_size, heads, dim] contiguous (it may be a view into a wider
    byte buffer, e.g. the KV link's payload after its header)."""
    check(buffer.dim() == 6 and buffer.is_contiguous(), "buffer must be the contiguous 6-d cache")
    check(page_ids.dtype in (torch.int32, torch.int64) and page_ids.dim() == 1, "page_ids must be 1-d ints")
    num_layers, parts, num_pages = buffer.shape[:3]
    chunk = buffer[0, 0, 0].numel()
    n = page_ids.numel()
    want = (num_layers, parts, n, *buffer.shape[3:])
    check(tuple(packed.shape) == want and packed.is_contiguous() and packed.dtype == buffer.dtype, f"data must be {want}")
    if n == 0:
        return
    block = min(4096, triton.next_power_of_2(chunk))
    grid = (num_layers * parts * n, triton.cdiv(chunk, block))
    src, dst = (packed, buffer) if scatter else (buffer, packed)
    _copy_pages_kernel[grid](src, dst, page_ids.to(buffer.device), num_pages, n, chunk,
                             SCATTER=scatter, BLOCK=block, num_warps=4)


def gather_pages(buffer: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    out = new_out((*buffer.shape[:2], page_ids.numel(), *buffer.shape[3:]), buffer.dtype, buffer.device)
    copy_pages(buffer, page_ids, out, scatter=False)
    return out


def scatter_pages(buffer: torch.Tensor, page_ids: torch.Tensor, data: torch.Tensor) -> None:
    copy_pages(buffer, page_ids, data, scatter=True)


# ---- cache -> cache (the same-host KV link: the decode copies from the prefill's mapped cache) ----
def copy_between_ref(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    dst.index_copy_(2, dst_ids.to(dst.device), src.index_select(2, src_ids.to(src.device)).to(dst.device))


@triton.jit
def _copy_between_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, src_pages, dst_pages, n, CHUNK,
                         BLOCK: tl.constexpr):
    run = tl.program_id(0).to(tl.int64)  # (layer * parts + part) * n + i
    lp, i = run // n, run % n
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < CHUNK
    v = tl.load(src_ptr + (lp * src_pages + s) * CHUNK + offs, mask=m)
    tl.store(dst_ptr + (lp * dst_pages + d) * CHUNK + offs, v, mask=m)


def copy_between(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst pages dst_ids[i] <- src pages src_ids[i], every layer and part, in one pass (one read and one
    write of each page: bytes = 2 * n * page_bytes). src and dst: 6-d caches of the same page shape
    (their page counts may differ); src may be another process's cache mapped here."""
    check(src.dim() == 6 and dst.dim() == 6 and src.is_contiguous() and dst.is_contiguous(), "6-d contiguous caches")
    check(src.shape[:2] == dst.shape[:2] and src.shape[3:] == dst.shape[3:] and src.dtype == dst.dtype,
          "src and dst must have the same page shape and dtype")
    check(src_ids.numel() == dst_ids.numel(), "as many source as destination pages")
    n = src_ids.numel()
    if n == 0:
        return
    chunk = src[0, 0, 0].numel()
    block = min(4096, triton.next_power_of_2(chunk))
    grid = (src.shape[0] * src.shape[1] * n, triton.cdiv(chunk, block))
    _copy_between_kernel[grid](src, dst, src_ids.to(dst.device), dst_ids.to(dst.device), src.shape[2], dst.shape[2],
                               n, chunk, BLOCK=block, num_warps=4)
