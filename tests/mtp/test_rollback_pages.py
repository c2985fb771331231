"""decode_worker.mtp.release_rejected_pages: pages grown for drafts that a rollback leaves empty go
back to the pool; the reservation and every page holding an accepted token stay (exact accounting)."""

from __future__ import annotations

import time

from glmserve.shared.kvcache.allocator import PageAllocator
from glmserve.shared.protocol import SamplingParams
from glmserve.decode_worker.mtp import release_rejected_pages
from glmserve.decode_worker.running import RunningSet
from glmserve.decode_worker.state import DecodeSeq

PAGE = 4


def _seq(pages: PageAllocator, prompt_len: int, reserved_pages: int) -> DecodeSeq:
    ids = pages.alloc_for("r", reserved_pages)
    seq = DecodeSeq("r", prompt_len, list(range(prompt_len)) + [7], SamplingParams(temperature=0), ids, "p0",
                    time.monotonic())
    seq.num_cached = prompt_len
    return seq


def test_rejected_draft_pages_are_freed_and_accepted_ones_kept():
    pages = PageAllocator(32)
    start_free = pages.num_free
    seq = _seq(pages, prompt_len=7, reserved_pages=2)  # positions 0..7 fit in 2 pages
    running = RunningSet(pages, PAGE)
    before = len(seq.page_ids)
    assert running.has_room(seq, extra=4)  # K = 4: positions up to 11 -> 3 pages
    assert len(seq.page_ids) == 3 and pages.num_free == start_free - 3
    seq.num_cached += 1  # only x_n accepted (all drafts rejected): next step writes position 8
    assert release_rejected_pages(seq, pages, PAGE, before) == []  # page 2 holds position 8: kept
    seq.num_cached -= 1
    # a shorter sequence: position 7 is the last cached-to-be; the grown page 2 holds only rejects
    seq.num_cached = 6
    freed = release_rejected_pages(seq, pages, PAGE, before)
    assert len(freed) == 1 and len(seq.page_ids) == 2 and pages.pages_of("r") == seq.page_ids
    assert pages.num_free == start_free - 2
    pages.check_consistent()
    pages.release("r")
    assert pages.num_free == start_free


def test_reserved_pages_are_never_trimmed():
    pages = PageAllocator(32)
    seq = _seq(pages, prompt_len=3, reserved_pages=5)  # a decode allowance beyond the prompt
    assert release_rejected_pages(seq, pages, PAGE, len(seq.page_ids)) == []
    assert len(seq.page_ids) == 5
