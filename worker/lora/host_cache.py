"""The host tier of one rank: adapters already read, validated, converted and sharded, kept after they
leave the pool (evicted, or refused for want of room), so that loading one again is a copy into the pool
instead of a file read. Exclusive of the pool: an entry is taken out (`pop`) when it goes in.

Least recently used first out, within a byte budget (ADAPTER_HOST_MEMORY). An entry is keyed by the
adapter's name and directory and by the size and modification time of its files, so an adapter whose
files changed on disk is read again. On a GPU the entries are page-locked (prepared with `pin`), so the
copy into the pool is asynchronous. Thread-safe: the loader thread and the RPC handlers both use it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from worker.lora.slots import PreparedAdapter

FILES = ("adapter_config.json", "adapter_model.safetensors")

CacheKey = tuple


def cache_key(name: str, path: Path) -> CacheKey:
    """(name, resolved directory, (file, size, mtime_ns) of each adapter file present)."""
    stats = []
    for file in FILES:
        try:
            st = os.stat(path / file)
        except OSError:
            continue
        stats.append((file, st.st_size, st.st_mtime_ns))
    return (name, str(Path(path).resolve()), tuple(stats))


class HostAdapterCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, PreparedAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def pop(self, key: CacheKey) -> PreparedAdapter | None:
        """The entry for `key`, taken out; None when absent."""
        with self._lock:
            prepared = self._entries.pop(key, None)
            if prepared is not None:
                self._bytes -= prepared.nbytes
            return prepared

    def put(self, key: CacheKey, prepared: PreparedAdapter) -> tuple[bool, list[str]]:
        """Keep `prepared`, dropping the least recently used entries over the budget; one larger than
        the whole budget is not kept. Returns (kept, the names of the adapters dropped)."""
        size = prepared.nbytes
        dropped: list[str] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.budget_bytes:
                return False, dropped
            while self._entries and self._bytes + size > self.budget_bytes:
                _, out = self._entries.popitem(last=False)
                self._bytes -= out.nbytes
                dropped.append(out.facts.name)
            self._entries[key] = prepared
            self._bytes += size
        return True, dropped

    def drop(self, name: str) -> bool:
        """Forget every entry of adapter `name`; whether there was one."""
        with self._lock:
            keys = [k for k, p in self._entries.items() if p.facts.name == name]
            for k in keys:
                self._bytes -= self._entries.pop(k).nbytes
        return bool(keys)
