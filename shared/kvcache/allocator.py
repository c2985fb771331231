"""Page allocator: which KV pages of one worker are free, and which request owns each used page.

Runs in the leader (TP rank 0) of every prefill and decode worker; page ids are the same on
every TP rank, so followers never allocate. Pure Python, no torch.

Invariants:
- every page id in [first_usable, num_pages) is either free or owned by exactly one owner;
  `num_free + num_used == capacity` at all times.
- page 0 is reserved (never handed out) when `reserve_dummy=True` (the default): CUDA-graph
  padding rows write their KV there, so padding never touches a real request's page.
- freed pages go to the back of a FIFO queue: a page just freed is the last to be reused,
  so a late reader of a freed page (a bug elsewhere) sees stale bytes of the same request
  for as long as possible rather than another request's KV.
- `release(rid)` is idempotent: releasing twice frees once and returns 0 the second time.
- `free` / `trim` of a page that is not used (or not owned by the given owner) raises:
  a double free is a bug, never silently ignored.

API: alloc(n) / free(ids) for anonymous pages (owner ANON); alloc_for(rid, n) appends n pages
to rid's list (a request grows one page at a time while decoding); pages_of(rid); trim(rid, keep)
frees rid's pages past the first `keep`; release(rid); check_idle() lists leaked pages.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

ANON = "<anon>"  # owner of pages taken with alloc() rather than alloc_for()


@dataclass(frozen=True)
class Leak:
    owner: str
    page_ids: tuple[int, ...]


class PageAllocator:
    def __init__(self, num_pages: int, reserve_dummy: bool = True):
        first = 1 if reserve_dummy else 0
        if num_pages <= first:
            raise ValueError(f"num_pages {num_pages} leaves no usable page (reserve_dummy={reserve_dummy})")
        self.num_pages = num_pages
        self.dummy_page: int | None = 0 if reserve_dummy else None
        self.first_usable = first
        self._free: collections.deque[int] = collections.deque(range(first, num_pages))
        self._owner: dict[int, str] = {}  # used page -> owner
        self._pages: dict[str, list[int]] = {}  # owner -> its pages in allocation order

    # ---- counts ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (num_pages minus the dummy page)."""
        return self.num_pages - self.first_usable

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def can_alloc(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    # ---- owned pages ----------------------------------------------------------------
    def alloc_for(self, rid: str, n: int) -> list[int] | None:
        """n more pages for rid (appended to its list), or None (nothing taken) when short."""
        if n < 0:
            raise ValueError(f"alloc_for({rid!r}, {n}): negative count")
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for p in ids:
            self._owner[p] = rid
        self._pages.setdefault(rid, []).extend(ids)
        return ids

    def pages_of(self, rid: str) -> list[int]:
        return list(self._pages.get(rid, ()))

    def owners(self) -> list[str]:
        return list(self._pages)

    def release(self, rid: str) -> int:
        """Free every page of rid; returns how many (0 when rid holds none: idempotent)."""
        ids = self._pages.pop(rid, [])
        for p in ids:
            del self._owner[p]
        self._free.extend(ids)
        return len(ids)

    def trim(self, rid: str, keep: int) -> list[int]:
        """Free rid's pages past its first `keep` (e.g. pages reserved but not needed); returns them."""
        ids = self._pages.get(rid, [])
        if keep < 0:
            raise ValueError(f"trim({rid!r}, {keep}): negative keep")
        gone = ids[keep:]
        del ids[keep:]
        for p in gone:
            del self._owner[p]
        self._free.extend(gone)
        if not ids:
            self._pages.pop(rid, None)
        return gone

    # ---- anonymous pages ------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """n pages owned by nobody in particular (ANON), or None when short."""
        return self.alloc_for(ANON, n)

    def free(self, ids: list[int]) -> None:
        """Free anonymous pages; raises on a page that is free, reserved, or owned by a request."""
        for p in ids:
            owner = self._owner.get(p)
            if owner != ANON:
                what = "free or reserved" if owner is None else f"owned by {owner!r}"
                raise ValueError(f"free({p}): page is {what}, not an anonymous allocation")
        anon = self._pages.get(ANON, [])
        drop = set(ids)
        if len(drop) != len(ids):
            raise ValueError(f"free({ids}): duplicate page ids")
        self._pages[ANON] = [p for p in anon if p not in drop]
        if not self._pages[ANON]:
            del self._pages[ANON]
        for p in ids:
            del self._owner[p]
        self._free.extend(ids)

    # ---- accounting -----------------------------------------------------------------
    def check_idle(self) -> list[Leak]:
        """Pages still used; call when the worker holds no request: any entry is a leak."""
        return [Leak(owner, tuple(ids)) for owner, ids in self._pages.items()]

    def check_consistent(self) -> None:
        """Assert the invariants in the module docstring (tests, debug)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not free & set(self._owner), "a page is both free and used"
        assert len(free) + len(self._owner) == self.capacity, "a page is lost"
        assert all(p >= self.first_usable for p in free | set(self._owner))
        listed = [p for ids in self._pages.values() for p in ids]
        assert sorted(listed) == sorted(self._owner), "owner lists disagree with the owner map"
