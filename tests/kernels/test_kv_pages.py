"""KV page gather/scatter kernels vs index_select / index_copy_."""

import torch

from glmserve.kernels.kv_pages import gather_pages, gather_pages_ref, scatter_pages, scatter_pages_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_gather_then_scatter_roundtrip():
    buf = torch.randn(3, 2, 11, 5, 2, 7, device=DEV).to(torch.bfloat16)
    ids = torch.tensor([9, 0, 4], dtype=torch.int32, device=DEV)
    packed = gather_pages(buf, ids)
    assert torch.equal(packed, gather_pages_ref(buf, ids.long()))
    dst, dst_ref = torch.randn_like(buf), None
    dst_ref = dst.clone()
    new_ids = torch.tensor([1, 10, 3], dtype=torch.int64, device=DEV)
    scatter_pages(dst, new_ids, packed)
    scatter_pages_ref(dst_ref, new_ids, packed)
    assert torch.equal(dst, dst_ref)


def test_copy_pages_into_the_link_payload_keeps_the_header():
    """The KV link gathers straight into its wire buffer (16-byte header, then the payload) and
    scatters from it: the kernel must write only the payload, at the header's offset."""
    from glmserve.kernels.kv_pages import copy_pages
    from glmserve.shared.kvcache.xfer_buffer import HEADER_BYTES, payload_view

    cache = torch.randn(2, 1, 9, 4, 1, 6, device=DEV).to(torch.bfloat16)
    ids = torch.tensor([7, 2, 5, 0], dtype=torch.int64, device=DEV)
    shape = (2, 1, 4, 4, 1, 6)
    wire = torch.full((HEADER_BYTES + cache[:, :, :4].numel() * 2,), 0xAB, dtype=torch.uint8, device=DEV)
    copy_pages(cache, ids, payload_view(wire, cache.dtype, shape), scatter=False)
    assert torch.all(wire[:HEADER_BYTES] == 0xAB)
    assert torch.equal(payload_view(wire, cache.dtype, shape), gather_pages_ref(cache, ids))
    dst = torch.zeros_like(cache)
    copy_pages(dst, ids, payload_view(wire, cache.dtype, shape), scatter=True)
    assert torch.equal(dst[:, :, ids], cache[:, :, ids])
    assert dst[:, :, [1, 3, 4, 6, 8]].abs().sum() == 0  # pages not named stay untouched


def test_copy_between_two_caches_of_different_page_counts():
    """The same-host link's one copy: src pages -> dst pages of another cache (page counts differ),
    equal to the index_select / index_copy_ reference; pages not named stay untouched."""
    from glmserve.kernels.kv_pages import copy_between, copy_between_ref

    src = torch.randn(3, 2, 13, 4, 2, 5, device=DEV).to(torch.bfloat16)
    dst = torch.randn(3, 2, 7, 4, 2, 5, device=DEV).to(torch.bfloat16)
    ref = dst.clone()
    s_ids = torch.tensor([12, 0, 5], dtype=torch.int32, device=DEV)
    d_ids = torch.tensor([2, 6, 3], dtype=torch.int64, device=DEV)
    copy_between(src, s_ids, dst, d_ids)
    copy_between_ref(src, s_ids.long(), ref, d_ids)
    assert torch.equal(dst, ref)
    assert torch.equal(dst[:, :, [2, 6, 3]], src[:, :, [12, 0, 5]])
