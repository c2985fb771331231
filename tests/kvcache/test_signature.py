"""LinkSignature comparison texts, the transfer header, and an accept that nobody answers."""


import pytest
import torch

from glmserve.shared.kvcache.cache import KVLayout
from glmserve.shared.kvcache.link import LinkError, LinkSignature
from glmserve.shared.kvcache.rendezvous import accept_link, open_store
from glmserve.shared.kvcache.xfer_buffer import HEADER_BYTES, check_header, new_send_buffer, xfer_hash
from glmserve.shared.ports import free_port

MLA = KVLayout(num_layers=48, num_parts=1, page_size=16, local_kv_heads=1, entry_dim=576, dtype=torch.bfloat16)
GQA = KVLayout(num_layers=93, num_parts=2, page_size=16, local_kv_heads=1, entry_dim=128, dtype=torch.bfloat16)


def test_signature_of_a_cache():
    sig = LinkSignature.for_cache("glm4_moe_lite", MLA, tp_size=2)
    assert (sig.dtype, sig.page_size, sig.num_layers, sig.tp_size) == ("bfloat16", 16, 48, 2)
    assert sig.kv_layout == "parts=1,heads=1,dim=576"


def test_differences_name_every_field_that_differs():
    a = LinkSignature.for_cache("glm4_moe_lite", MLA, tp_size=1)
    b = LinkSignature.for_cache("glm4_moe", GQA, tp_size=2)
    diffs = a.differences(b)
    assert diffs == [
        "model_name differs (prefill 'glm4_moe_lite', decode 'glm4_moe')",
        "num_layers differs (prefill 48, decode 93)",
        "kv_layout differs (prefill 'parts=1,heads=1,dim=576', decode 'parts=2,heads=1,dim=128')",
        "tp_size differs (prefill 1, decode 2)",
    ]
    assert a.differences(LinkSignature(**a.to_json_dict())) == []


def test_header_names_transfer_and_size():
    buf, _ = new_send_buffer("r1/0", 64, torch.device("cpu"))
    header = buf[:HEADER_BYTES].view(torch.int64)
    assert header.tolist() == [xfer_hash("r1/0"), 64]
    assert check_header("r1/0", 64, header) == ""
    assert "different orders or sizes" in check_header("r1/1", 64, header)
    assert "(32 bytes) got another transfer (64 bytes)" in check_header("r1/0", 32, header)
    assert xfer_hash("r1/0") != xfer_hash("r1/1")


def test_accept_without_a_prefill_gives_up_with_a_clear_error():
    port = free_port()
    store = open_store("127.0.0.1", port, is_host=True)
    sig = LinkSignature.for_cache("m", MLA, 1)
    with pytest.raises(LinkError, match="no connection attempt from the prefill within 0.3 s"):
        accept_link(store, "p9", "d0", 0, sig, "cpu", timeout_s=0.3)
