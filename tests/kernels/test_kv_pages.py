"""KV page gather/scatter kernels vs index_select / index_copy_."""

import torch

from kernels.kv_pages import gather_pages, gather_pages_ref, scatter_pages, scatter_pages_ref

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
