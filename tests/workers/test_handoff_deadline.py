"""The decode's handoff deadline restarts at every accepted push (pure Python, decode_worker/handoff.py)."""

import time

from glmserve.shared import protocol as P
from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.decode_worker.handoff import Handoffs


def test_handoff_deadline_restarts_at_each_push():
    """Reserve at t0; a push arrives after most of the deadline (a prefill that compiled kernels
    for its first long step): the request must not expire right after its recv completed."""
    h = Handoffs(PageAllocator(32), page_size=4, max_running=8, reserve_cap=8, deadline_s=0.3)
    seq = h.reserve(P.Reserve(rid="a", prompt_ids=P.pack_ids(list(range(5, 13))),
                              sampling=P.SamplingParams(max_new_tokens=8), prefill_id="p0"))
    time.sleep(0.25)
    assert h.on_chunk(P.KVChunkReady(rid="a", prefill_id="p0", page_ids=P.pack_ids(seq.page_ids[:1]),
                                     num_tokens=4, chunk_index=0)) is None
    seq.pending_xfers.clear()  # the recv completed
    time.sleep(0.1)  # 0.35 s after the Reserve, 0.1 s after the push
    assert h.expired() == []
    time.sleep(0.3)
    assert h.expired() == [seq]
