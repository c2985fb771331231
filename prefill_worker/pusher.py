"""KV push side of the prefill worker leader: announces and posts page sends, frees after.

After each step, every chunk's newly complete pages are pushed to the request's decode worker:
first a KVChunkReady on the decode's control socket (so the decode posts the matching recv in
the same order), then a "send" LinkOp run by every TP rank right after the forward. The last
push of a prompt also sends the final hidden state (MTP seed) and carries the first token.

A request's own pages are released only after every send of it completed on rank 0 and a
"wait" op made every follower rank wait for its own sends (so no rank rewrites a page still
being sent). Invariant: a rid is in `inflight` from its first push until that release.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from glmserve.shared.protocol import KVChunkReady, pack_ids
from glmserve.shared.worker_common.plan import LinkOp
from glmserve.prefill_worker.scheduler import PrefillSeq


@dataclass
class Inflight:
    seq: PrefillSeq
    xfers: dict[str, tuple[float, int]] = field(default_factory=dict)  # xfer_id -> (start time, bytes)
    closed: bool = False  # no more pushes will be made (last push posted, or aborted)


def complete_pages(seq: PrefillSeq, page_size: int) -> int:
    """Pages of the prompt whose every token's KV is written (all pages once the prompt is done)."""
    return len(seq.page_ids) if seq.done else seq.num_done // page_size


@dataclass
class Push:
    decode_id: str
    announce: KVChunkReady
    op: LinkOp


class Pusher:
    def __init__(self, worker_id: str, page_size: int, page_bytes: int):
        self.worker_id = worker_id
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.inflight: dict[str, Inflight] = {}

    def push(self, seq: PrefillSeq, hidden_row: int) -> Push | None:
        """The next push of `seq` after a step (None when no new page is complete and not last).

        hidden_row: row of this step's hidden states holding the prompt's last token (last push).
        The first token goes to the decode in its own FirstToken message, after sampling."""
        lo, hi = seq.num_pushed_pages, complete_pages(seq, self.page_size)
        is_last = seq.done
        if hi == lo and not is_last:
            return None
        k = seq.num_chunks_pushed
        xfer = f"{seq.rid}/{k}"
        ann = KVChunkReady(
            rid=seq.rid, prefill_id=self.worker_id, page_ids=pack_ids(seq.decode_page_ids[lo:hi]),
            num_tokens=seq.num_done, is_last=is_last, chunk_index=k, has_hidden=is_last,
        )
        op = LinkOp("send", seq.decode_id, xfer, pack_ids(seq.page_ids[lo:hi]), hidden_row=hidden_row if is_last else -1)
        seq.num_pushed_pages, seq.num_chunks_pushed = hi, k + 1
        entry = self.inflight.setdefault(seq.rid, Inflight(seq))
        entry.xfers[xfer] = (time.monotonic(), (hi - lo) * self.page_bytes)
        entry.closed = is_last
        return Push(seq.decode_id, ann, op)

    def abort_announce(self, seq: PrefillSeq) -> KVChunkReady:
        """Tell the decode no more KV comes for seq (no link op; the decode frees after its recvs)."""
        self.inflight.setdefault(seq.rid, Inflight(seq)).closed = True
        k = seq.num_chunks_pushed
        seq.num_chunks_pushed = k + 1
        return KVChunkReady(rid=seq.rid, prefill_id=self.worker_id, page_ids=b"", num_tokens=seq.num_done,
                            is_last=True, chunk_index=k, aborted=True)

    def done_xfer(self, rid: str, xfer: str) -> tuple[float, int]:
        """Forget a completed transfer; returns (seconds, bytes) for the metrics."""
        t0, nbytes = self.inflight[rid].xfers.pop(xfer)
        return time.monotonic() - t0, nbytes

    def releasable(self) -> list[Inflight]:
        """Requests whose pushes are all posted and completed: pop them (caller waits + frees)."""
        out = [e for e in self.inflight.values() if e.closed and not e.xfers]
        for e in out:
            del self.inflight[e.seq.rid]
        return out
