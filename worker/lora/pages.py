"""Pages of rank rows for the adapter pool of one rank: which rows each width class holds (no torch).

The pool (`worker/lora/pool.py`) is one flat tensor `storage: [num_pages * page_elems]`. A **row** is one
rank row of one LoRA factor of one (layer, module): an A row has h_in_local elements, a B row (B
transposed, scale folded) h_out_local. The widths a model needs are few (Llama: hidden, kv dim,
intermediate, or their tensor-parallel shares); each is a **width class**.

Class w views the whole storage as `[num_rows(w), w]` with num_rows(w) = num_pages * page_elems // w, a
plain contiguous view, so a **row id** is an index into that view and row j of class w starts at element
j * w of the storage. A page holds rows of one class while any of them is used, and a row is only ever
handed out when it lies wholly inside one page: the row ids of class w in page p are

    page_rows(p) = range(ceil(p * page_elems / w), floor((p + 1) * page_elems / w))

When w divides page_elems (the usual case, see `page_elems_for`) that is
`p * (page_elems // w) + slot` for slot in range(page_elems // w), and a page has no tail. Otherwise a row
that would straddle two pages is never handed out; its elements stay unused (NaN in the pool).

`RowAllocator` is the bookkeeping: all-or-nothing allocation of rows per class, taken from the holes of
the class's partly used pages first (lowest page first, lowest row first), then from free pages (lowest
first). It is deterministic, so every tensor-parallel rank given the same calls hands out the same rows
and agrees on whether an adapter fits.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping

MAX_PAGE_ELEMS = 1 << 22  # beyond this the lcm of the widths is not used as the page size
FALLBACK_PAGE_ROWS = 64  # a fallback page is this many rows of the widest class (so a multiple of 64)
MAX_ROW_ID = (1 << 31) - 1  # row ids travel in int32 tables


class PoolFullError(RuntimeError):
    """Not enough free pages for an allocation; nothing was allocated."""

    def __init__(self, pages_needed: int, free_pages: int, demand: Mapping[int, int]):
        self.pages_needed = pages_needed
        self.free_pages = free_pages
        rows = ", ".join(f"{n} rows of width {w}" for w, n in sorted(demand.items()))
        super().__init__(f"adapter pool full: {rows} need {pages_needed} new pages, {free_pages} are free")


def page_elems_for(widths: Iterable[int], max_page_elems: int = MAX_PAGE_ELEMS) -> int:
    """The page size, in elements, for rows of `widths`.

    The lcm of the widths: every class then fills a page exactly (no tail) and the lcm is already at
    least the widest width, so a page holds at least one row of every class. Real models give small lcms
    (SmolLM2 576/192/1536: 4608; at tp=3 also with 64/512: 4608; Llama-3-8B 4096/1024/14336: 28672).

    If the lcm exceeds `max_page_elems` (widths with large coprime factors), the page is instead
    FALLBACK_PAGE_ROWS rows of the widest width, a multiple of 64 elements. Rows never
    straddle pages (module docstring), so a class that does not divide the page loses at most the
    elements of two rows per page: under 2 / FALLBACK_PAGE_ROWS of it (about 3%), and every class has at
    least one row per page because the page is at least twice the widest width.
    """
    widths = _check_widths(widths)
    lcm = math.lcm(*widths)
    if lcm <= max_page_elems:
        return lcm
    return FALLBACK_PAGE_ROWS * max(widths)


def _check_widths(widths: Iterable[int]) -> tuple[int, ...]:
    widths = tuple(sorted(set(widths)))
    if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"row widths must be positive ints, got {widths}")
    return widths


class RowAllocator:
    """Row ids per width class over `num_pages` pages of `page_elems` elements (module docstring).

    State: for each page its class (0 = free), its used-row count and, while owned, one byte per row
    (1 = used). Each class keeps a heap of its partly used pages; free pages are a heap too. Every
    operation is O(rows asked or freed + pages touched) up to heap logarithms.
    """

    def __init__(self, num_pages: int, page_elems: int, widths: Iterable[int]):
        self.widths = _check_widths(widths)
        if num_pages < 0 or page_elems <= 0:
            raise ValueError(f"need num_pages >= 0 and page_elems > 0, got {num_pages}, {page_elems}")
        for w in self.widths:
            if page_elems % w and page_elems < 2 * w:
                raise ValueError(
                    f"page of {page_elems} elements: width {w} neither divides it nor fits twice "
                    "(some pages would hold no row; use page_elems_for)"
                )
        if num_pages * page_elems // self.widths[0] > MAX_ROW_ID + 1:
            raise ValueError(f"{num_pages} pages of {page_elems}: row ids of {self.widths[0]} exceed int32")
        self.num_pages = num_pages
        self.page_elems = page_elems
        self._page_width = [0] * num_pages  # class of each page, 0 = free
        self._page_used = [0] * num_pages  # used rows in each page
        self._slots: dict[int, bytearray] = {}  # owned page -> 1 byte per row of it, 1 = used
        self._free = list(range(num_pages))  # heap of free pages (a sorted list is a heap)
        self._partial = {w: [] for w in self.widths}  # heap of pages of class w with free rows
        self._in_partial = {w: set() for w in self.widths}  # pages in that heap (some may be stale)
        self._holes = dict.fromkeys(self.widths, 0)  # free rows in the pages class w owns
        # A lower bound on any page's rows of class w (a row lost at each end at most), for pages_needed.
        self._min_rows = {w: page_elems // w - (page_elems % w != 0) for w in self.widths}

    def num_rows(self, width: int) -> int:
        """Rows of the class view `[num_rows, width]` over the whole storage."""
        self._check_width(width)
        return self.num_pages * self.page_elems // width

    def page_rows(self, page: int, width: int) -> range:
        """Row ids of class `width` lying wholly inside `page` (any page index, even past the pool)."""
        return range(-(-page * self.page_elems // width), (page + 1) * self.page_elems // width)

    def page_of(self, row: int, width: int) -> int:
        """The page whose elements row `row` of class `width` starts in."""
        return row * width // self.page_elems

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def free_rows(self, width: int) -> int:
        """Free rows in the pages class `width` already holds: what it can take without a new page."""
        self._check_width(width)
        return self._holes[width]

    def page_width(self, page: int) -> int:
        """The class owning `page`, 0 when the page is free."""
        return self._page_width[page]

    def pages_needed(self, demand: Mapping[int, int]) -> int:
        """The free pages `allocate(demand)` takes, exactly. When that is more than are free, the count
        is as if the pool went on past its last page."""
        demand = self._check_demand(demand)
        bound = sum(-(-max(0, n - self._holes[w]) // self._min_rows[w]) for w, n in demand.items())
        pages = itertools.chain(heapq.nsmallest(bound, self._free), itertools.count(self.num_pages))
        needed = 0
        for w, n in demand.items():  # the order `allocate` serves them in
            left = n - self._holes[w]
            while left > 0:
                left -= len(self.page_rows(next(pages), w))
                needed += 1
        return needed

    def allocate(self, demand: Mapping[int, int]) -> dict[int, list[int]]:
        """`demand[w]` rows of each class w, all or nothing: raises PoolFullError (naming the pages
        needed and free) and changes nothing when they do not fit. Classes are served in increasing
        width; each takes the holes of its partly used pages (lowest page, then lowest row, first), then
        free pages (lowest first). Returns width -> row ids, in the order taken."""
        demand = self._check_demand(demand)
        needed = self.pages_needed(demand)
        if needed > len(self._free):
            raise PoolFullError(needed, len(self._free), demand)
        return {w: self._take(w, n) for w, n in demand.items()}

    def _take(self, w: int, n: int) -> list[int]:
        rows: list[int] = []
        heap, members = self._partial[w], self._in_partial[w]
        while len(rows) < n and heap:
            p = heap[0]
            if self._page_width[p] != w or self._page_used[p] == len(self._slots[p]):
                heapq.heappop(heap)  # stale: the page was freed (or filled) since it was pushed
                members.discard(p)
                continue
            self._take_from_page(p, w, n - len(rows), rows)
        while len(rows) < n:
            p = heapq.heappop(self._free)
            self._page_width[p] = w
            self._slots[p] = bytearray(len(self.page_rows(p, w)))
            self._holes[w] += len(self._slots[p])
            self._take_from_page(p, w, n - len(rows), rows)
            if self._page_used[p] < len(self._slots[p]) and p not in members:
                heapq.heappush(heap, p)
                members.add(p)
        return rows

    def _take_from_page(self, p: int, w: int, n: int, rows: list[int]) -> None:
        slots, first = self._slots[p], self.page_rows(p, w).start
        k = min(n, len(slots) - self._page_used[p])
        s = -1
        for _ in range(k):
            s = slots.index(0, s + 1)
            slots[s] = 1
            rows.append(first + s)
        self._page_used[p] += k
        self._holes[w] -= k

    def free(self, rows: Mapping[int, Iterable[int]]) -> list[int]:
        """Give back rows (width -> row ids). All are checked first: a row that is not in use (double
        free), of another class, straddling pages, out of range or repeated raises ValueError and
        nothing is freed. Returns the pages that became free (their rows were all free), ascending."""
        checked = {w: self._check_used(w, ids) for w, ids in rows.items()}
        emptied = []
        for w, ids in checked.items():
            for row, p in ids:
                self._slots[p][row - self.page_rows(p, w).start] = 0
                self._page_used[p] -= 1
                self._holes[w] += 1
                if self._page_used[p] == 0:
                    self._holes[w] -= len(self._slots.pop(p))
                    self._page_width[p] = 0
                    heapq.heappush(self._free, p)
                    emptied.append(p)
                elif p not in self._in_partial[w]:
                    heapq.heappush(self._partial[w], p)
                    self._in_partial[w].add(p)
        return sorted(emptied)

    def _check_width(self, width: int) -> None:
        if width not in self._holes:
            raise ValueError(f"no row class of width {width}; the pool has {self.widths}")

    def _check_demand(self, demand: Mapping[int, int]) -> dict[int, int]:
        for w, n in demand.items():
            self._check_width(w)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"row count for width {w} must be an int >= 0, got {n!r}")
        return {w: demand[w] for w in sorted(demand) if demand[w]}

    def _check_used(self, w: int, ids: Iterable[int]) -> list[tuple[int, int]]:
        """[(row, page)] of `ids` after checking each is a used row of class w, once."""
        self._check_width(w)
        out, seen = [], set()
        for row in ids:
            p = self.page_of(row, w) if 0 <= row < self.num_rows(w) else -1
            if p < 0 or row not in self.page_rows(p, w) or row in seen:
                raise ValueError(f"row {row} of width {w}: not a row of the pool, or freed twice in one call")
            if self._page_width[p] != w or not self._slots[p][row - self.page_rows(p, w).start]:
                raise ValueError(f"row {row} of width {w} is not in use (double free or foreign row id)")
            seen.add(row)
            out.append((row, p))
        return out
