"""PageAllocator: owner accounting, idempotent release, double-free detection, leak check."""

import random

import pytest

from glmserve.shared.kvcache.allocator import ANON, PageAllocator


def test_dummy_page_zero_is_never_handed_out():
    a = PageAllocator(5)
    assert a.capacity == 4 and a.dummy_page == 0
    ids = a.alloc_for("r", 4)
    assert sorted(ids) == [1, 2, 3, 4]
    assert a.alloc_for("s", 1) is None
    b = PageAllocator(5, reserve_dummy=False)
    assert sorted(b.alloc(5)) == [0, 1, 2, 3, 4] and b.dummy_page is None


def test_alloc_for_appends_and_release_is_idempotent():
    a = PageAllocator(10)
    first, more = a.alloc_for("r1", 3), a.alloc_for("r1", 2)
    a.alloc_for("r2", 1)
    assert a.pages_of("r1") == first + more and a.num_used == 6 and a.num_free == 3
    assert a.release("r1") == 5
    assert a.release("r1") == 0  # second release frees nothing
    assert a.num_free == 8 and a.pages_of("r1") == []
    a.check_consistent()


def test_short_alloc_takes_nothing():
    a = PageAllocator(4)
    assert a.alloc_for("r", 4) is None
    assert a.num_free == 3 and a.check_idle() == []
    with pytest.raises(ValueError):
        a.alloc_for("r", -1)


def test_freed_pages_are_reused_last():
    a = PageAllocator(6)
    x = a.alloc_for("a", 2)
    a.release("a")
    y = a.alloc_for("b", 3)
    assert not set(x) & set(y)  # three other free pages existed: the just-freed ones wait


def test_free_rejects_double_free_and_foreign_pages():
    a = PageAllocator(8)
    anon = a.alloc(2)
    owned = a.alloc_for("r", 1)
    with pytest.raises(ValueError, match="owned by 'r'"):
        a.free(owned)
    a.free(anon)
    with pytest.raises(ValueError, match="free or reserved"):
        a.free(anon[:1])
    with pytest.raises(ValueError, match="free or reserved"):
        a.free([0])
    assert a.num_used == 1 and a.num_free == 6
    a.check_consistent()


def test_trim_frees_the_tail_only():
    a = PageAllocator(10)
    ids = a.alloc_for("r", 5)
    assert a.trim("r", 2) == ids[2:]
    assert a.pages_of("r") == ids[:2] and a.num_used == 2
    assert a.trim("r", 0) == ids[:2] and a.owners() == []


def test_check_idle_reports_leaks_by_owner():
    a = PageAllocator(10)
    a.alloc_for("leaky", 2)
    a.alloc(1)
    leaks = {leak.owner: len(leak.page_ids) for leak in a.check_idle()}
    assert leaks == {"leaky": 2, ANON: 1}


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    a = PageAllocator(64)
    live: set[str] = set()
    for i in range(2000):
        op = rng.random()
        if op < 0.5:
            rid = f"r{rng.randrange(40)}"
            if a.alloc_for(rid, rng.randrange(0, 6)) is not None:
                live.add(rid)
        elif op < 0.8 and live:
            rid = rng.choice(sorted(live))
            a.release(rid)
            a.release(rid)
            live.discard(rid)
        elif live:
            rid = rng.choice(sorted(live))
            a.trim(rid, rng.randrange(0, 4))
        a.check_consistent()
    for rid in list(a.owners()):
        a.release(rid)
    assert a.check_idle() == [] and a.num_free == a.capacity
