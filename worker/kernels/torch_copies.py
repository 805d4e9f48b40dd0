"""The cache of the CPU ops' weight copies gathered from the adapter pool, bounded in bytes: the grouped
path's padded copies of a batch's adapters (`torch_grouped.py`) and the segment path's copies of one
adapter (`torch_segments.py`).

Valid by construction, with no version counter: a key names the pool (the data pointers of its views,
kept alive by the entry, so no other pool can take that memory while the entry lives), the site's
(layer, module) keys, and the adapter handles and ranks the copies hold. An adapter's rows never change
while it is placed and a handle is never reused in its pool, so equal keys mean equal copies.

An entry not used within the last `_STALE_STEPS * sites` site calls (about that many steps; sites: the
distinct sites seen) is dropped: a released adapter's copies, or a finished batch's, are never hit again.

When the budget is spent, eviction is least recently used, except that an entry used within the last
`2 * sites` site calls is never evicted for another: a decode step touches every
site once, so when one step's copies exceed the budget the first ones stay cached and the rest are
rebuilt each call, instead of every call evicting the entry the next call needs (what plain LRU does to
a cyclic sweep).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.kernels.pool_args import PoolPart

_MAX_SITES_TRACKED = 1 << 14  # past this many distinct site keys the set restarts (pools replaced)
_STALE_STEPS = 8


@dataclass
class _Entry:
    weights: list  # per bucket, as torch_grouped builds them
    nbytes: int
    holds: tuple[torch.Tensor, ...]  # the pool views whose data pointers the key names
    used: int  # the site call count when last used


class CopyCache:
    """(site, content) -> copies, bounded in bytes (module docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.misses = 0  # copies built (for tests and benchmarks)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._sites: set = set()
        self._calls = 0

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, site: tuple) -> None:
        """Count one call of `site` (the clock of the eviction rules) and drop stale entries."""
        self._calls += 1
        if site not in self._sites:
            if len(self._sites) >= _MAX_SITES_TRACKED:
                self._sites.clear()
            self._sites.add(site)
        stale = self._calls - _STALE_STEPS * len(self._sites)
        while self._entries:  # least recently used first: stops at the first fresh entry
            key, oldest = next(iter(self._entries.items()))
            if oldest.used > stale:
                break
            del self._entries[key]
            self.nbytes -= oldest.nbytes

    def open_site(self, a_view: torch.Tensor, parts: Sequence[PoolPart]) -> tuple[tuple, tuple]:
        """(the site's key, the pool views it names) for one call of the site, counted (`begin`).
        Within one pool a (layer, module) key fixes the widths; the pointers name the pool."""
        site = (a_view.data_ptr(), tuple((p.key, p.b_view.data_ptr()) for p in parts))
        self.begin(site)
        return site, (a_view, *(p.b_view for p in parts))

    def fetch(self, site: tuple[tuple, tuple], content: tuple, build: Callable[[], tuple[object, int]]):
        """The copies under (site, content); on a miss `build()` -> (copies, nbytes), kept if the
        budget allows. `site`: from `open_site`."""
        key, holds = site
        copies = self.get(key, content)
        if copies is None:
            copies, nbytes = build()
            self.put(key, content, copies, nbytes, holds)
        return copies

    def get(self, site: tuple, content: tuple):
        """The copies cached under (site, content), or None."""
        entry = self._entries.get((site, content))
        if entry is None:
            self.misses += 1
            return None
        entry.used = self._calls
        self._entries.move_to_end((site, content))
        return entry.weights

    def put(self, site: tuple, content: tuple, weights, nbytes: int, holds: tuple[torch.Tensor, ...]) -> None:
        """Cache copies of `nbytes` just built by the call that missed, if the budget allows (module
        docstring)."""
        recent = self._calls - 2 * len(self._sites)
        while self.nbytes + nbytes > self.max_bytes and self._entries:
            key, oldest = next(iter(self._entries.items()))
            if oldest.used > recent:
                return
            del self._entries[key]
            self.nbytes -= oldest.nbytes
        if self.nbytes + nbytes <= self.max_bytes:
            self._entries[(site, content)] = _Entry(weights, nbytes, holds, self._calls)
            self.nbytes += nbytes
