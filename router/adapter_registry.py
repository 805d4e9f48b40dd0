"""The adapter registry: names -> adapters, which of them sit in worker slots, and the policy that loads,
evicts and unloads them. The router decides; the workers execute (router/adapter_loader.py).

A request's adapter id becomes a lease (`acquire`), resolved in this order: 1. a name already registered
(LORA_ADAPTERS, the load route, an earlier first request); 2-4. `router.adapter_resolver`: the adapter
roots, the HF cache, a Hub download if allowed, narrowed by lorax's `adapter_source`. The first request
for an adapter registers it at once, so that concurrent first requests share its one load (a task that
nobody's cancellation stops).

Room: a load needs a slot (a number, MAX_LORA_ADAPTERS of them) and room in every rank's adapter pool
(ADAPTER_MEMORY, where the adapter takes its true size). It takes a free slot, else evicts the least
recently used resident adapter that is not pinned and has no refs (UnloadAdapter on every rank first;
the slot is then loaded with a new generation), else waits until one can be freed (a request waits, it
does not fail). A pool without room refuses the load and changes nothing: the registry evicts the same
way and loads again, so big adapters push out as many small ones as they need. If only pinned adapters
hold what is needed, it fails at once. A failed load answers all its waiters with the worker's reason
and is remembered for FAILURE_MEMORY_S. An evicted adapter's weights go to the ranks' host tier
(ADAPTER_HOST_MEMORY) when it has room, so loading it again is a copy.

Refs: a lease is one ref (router/adapters.py); the request takes one in `acquire`, each of its sequences
one more (lifecycle), and the scheduler drops a sequence's when it frees the sequence. Unload removes the
name at once; its slot is emptied when its refs reach 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from router.adapter_loader import SlotLoader
from router.adapter_metrics import AdapterMetrics
from router.adapter_resolver import (
    ADAPTER_FILES,
    AdapterDownloadError,
    AdapterRefusedError,
    AdapterResolver,
    ResolvedAdapter,
)
from router.adapter_slots import SlotPool
from router.adapters import (
    AdapterCapacityError,
    AdapterEntry,
    AdapterExistsError,
    AdapterLease,
    AdapterLoadError,
    AdapterLoadFailedError,
    AdapterMemory,
    AdapterMemoryFullError,
    Residency,
    UnknownAdapterError,
)
from router.client import ShardedClient
from router.config import AdapterSource

log = logging.getLogger(__name__)

# Clients retry a failed request, and every request for an adapter that fails to resolve or load would
# repeat the file reads, the worker load or the Hub call (LoRAX #430): the failure is answered from memory
# for this long, which still lets a fixed adapter load soon after. Remembered per (name, adapter_source):
# a name found nowhere under the roots may still be on the Hub; a registered name's source is None.
FAILURE_MEMORY_S = 10.0
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_NOT_REMEMBERED = (AdapterRefusedError, AdapterCapacityError)  # cost no I/O to find again


class AdapterRegistry:
    def __init__(
        self,
        client: ShardedClient,
        base_model_id: str,
        resolver: AdapterResolver,
        num_slots: int,
        metrics: AdapterMetrics,
    ):
        self.base_model_id = base_model_id
        self.resolver = resolver
        self.slots = SlotPool(num_slots)
        self.waiting = 0  # requests waiting on a load
        self._loader = SlotLoader(client, self._slot_emptied, self._unloaded)
        self._emptying: dict[int, AdapterEntry] = {}  # slot -> the adapter an unload is taking out
        self._metrics = metrics
        self._entries: dict[str, AdapterEntry] = {}
        self._draining: list[AdapterEntry] = []  # unloaded, their slots not yet emptied
        # (name, source) -> (monotonic deadline, error), oldest first
        self._failures: dict[tuple[str, str | None], tuple[float, Exception]] = {}
        self._generations = itertools.count(1)  # load generations: > 0, never reused
        self._ticks = itertools.count(1)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def start(self, sources: Sequence[AdapterSource]) -> None:
        """Load LORA_ADAPTERS into slots 1..N, in order, pinned; raises AdapterLoadError naming one."""
        ids = [s.id for s in sources]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise AdapterLoadError(f"adapter ids must be unique; repeated: {', '.join(duplicates)}")
        if any(self.is_base(i) for i in ids):
            raise AdapterLoadError(
                f"an adapter cannot be named {self.base_model_id!r} or '' (they mean the base model)"
            )
        if len(sources) > self.slots.total:
            raise AdapterLoadError(
                f"{len(sources)} adapters configured but the workers have {self.slots.total} adapter slots"
            )
        for source in sources:
            path = Path(source.path)
            entry = AdapterEntry(source.id, "startup", source.source, pinned=True, path=path)
            if path.parent.name == "snapshots" and _COMMIT_RE.fullmatch(path.name):
                entry.revision = path.name  # an HF cache snapshot: its directory is the commit
            entry.disk_bytes = await asyncio.to_thread(_disk_bytes, path)
            self._entries[source.id] = entry
            log.info("Loading adapter weights into model: %s", source.id)
            try:
                await self._load(entry)
            except AdapterLoadFailedError as e:
                raise AdapterLoadError(f"failed to load adapter {source.id!r} from {path}: {e.reason}") from e

    def is_base(self, adapter_id: str | None) -> bool:
        return adapter_id is None or adapter_id == "" or adapter_id == self.base_model_id

    def registered(self, adapter_id: str | None) -> bool:
        return adapter_id in self._entries

    # ---- requests -------------------------------------------------------------------------------

    async def acquire(self, adapter_id: str | None, source: str | None = None) -> AdapterLease | None:
        """A lease on the adapter `adapter_id` names, resident in a slot (None for the base model).

        Waits for its load (and for a slot); raises what resolving or loading raised: the resolver's
        AdapterResolveError, AdapterLoadFailedError, AdapterCapacityError."""
        if adapter_id is None or self.is_base(adapter_id):
            return None
        entry = self._entries.get(adapter_id)
        self._raise_remembered((adapter_id, None if entry is not None else source))
        if entry is None:
            entry = self._register(AdapterEntry(adapter_id, "root", adapter_id, pinned=False, source=source))
            self._start_load(entry, lambda: self.resolver.resolve(adapter_id, source))
        entry.refs += 1
        try:
            if entry.residency is not None:
                self._metrics.hit("device")
            else:
                self._metrics.hit("host" if entry.in_host else "disk")
                if entry.load_task is None:
                    self._start_load(entry, None)
                assert entry.load_task is not None
                self.waiting += 1
                try:
                    await asyncio.shield(entry.load_task)
                finally:
                    self.waiting -= 1
        except BaseException:
            self._drop(entry)
            raise
        entry.used(next(self._ticks))
        return AdapterLease(entry, self._drop)

    # ---- the load and unload routes ---------------------------------------------------------------

    async def load(self, name: str, lora_path: str, pinned: bool = False) -> AdapterEntry:
        """Register `name` for `lora_path` (a directory inside a root, or a Hub id) and load it now.

        Raises AdapterExistsError, the resolver's errors, AdapterLoadFailedError, AdapterCapacityError;
        on failure the name stays unregistered."""
        if self.is_base(name):
            raise AdapterExistsError(name, f"an adapter cannot be named {name!r}: it means the base model")
        if name in self._entries:
            raise AdapterExistsError(name, f"The lora adapter '{name}' has already been loaded.")
        entry = self._register(AdapterEntry(name, "route", lora_path, pinned=pinned))
        task = self._start_load(entry, lambda: self.resolver.resolve_path(lora_path))
        await asyncio.shield(task)
        return entry

    async def unload(self, name: str) -> None:
        """Make `name` unroutable now; its slot is emptied on every rank now if nothing uses it (before
        this returns), else once its last lease is released. Raises UnknownAdapterError."""
        entry = self._entries.pop(name, None)
        if entry is None:
            raise UnknownAdapterError(name)
        entry.removed = True
        self._failures.pop((name, None), None)
        if entry.in_host:  # out of the pool, its weights still in the host tiers: free them too
            entry.in_host = False
            await self._loader.drop_host_copy(name)
        if entry.residency is None and entry.load_task is None:
            return
        self._draining.append(entry)
        if entry.refs == 0 and entry.load_task is None:
            await self._empty_removed(entry)
        else:
            log.info("adapter %r unloaded; its slot empties after its %d requests", name, entry.refs)

    # ---- what the routes and metrics show ---------------------------------------------------------

    def entries(self) -> list[AdapterEntry]:
        """Registered adapters (in registration order), then unloaded ones whose slot is not empty yet."""
        return [*self._entries.values(), *self._draining]

    def loaded(self) -> list[AdapterEntry]:
        """Registered adapters that have been loaded (their info is known): routable without resolving."""
        return [e for e in self._entries.values() if e.info is not None]

    def failure(self, name: str) -> str | None:
        """The remembered failure of registered `name`'s last load, if still remembered."""
        remembered = self._failures.get((name, None))
        return str(remembered[1]) if remembered and remembered[0] > time.monotonic() else None

    async def close(self) -> None:
        """Stop the loads and unloads in progress (at shutdown)."""
        tasks = [*self._tasks, *(e.load_task for e in self.entries() if e.load_task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._loader.close()

    # ---- loading ----------------------------------------------------------------------------------

    def _register(self, entry: AdapterEntry) -> AdapterEntry:
        self._entries[entry.name] = entry
        return entry

    def _start_load(self, entry: AdapterEntry, resolve: Callable[[], ResolvedAdapter] | None) -> asyncio.Task:
        entry.load_task = task = asyncio.create_task(self._loading(entry, resolve), name=f"load-{entry.name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters may all have gone
        return task

    async def _loading(self, entry: AdapterEntry, resolve: Callable[[], ResolvedAdapter] | None) -> None:
        """Resolve `entry` (first loads), then load it; on failure forget or remember it."""
        try:
            if resolve is not None:
                await self._resolve(entry, resolve)
            await self._load(entry)
        except Exception as e:
            self._failed(entry, e)
            raise
        finally:
            entry.load_task = None
            self._settle(entry)
        self._failures.pop((entry.name, entry.source), None)

    async def _resolve(self, entry: AdapterEntry, resolve: Callable[[], ResolvedAdapter]) -> None:
        try:
            resolved = await asyncio.to_thread(resolve)
        except AdapterDownloadError:
            self._metrics.load("hub-download", ok=False)
            raise
        if entry.kind != "route":
            entry.kind = resolved.kind
        entry.path, entry.revision = resolved.path, resolved.revision
        entry.disk_bytes = await asyncio.to_thread(_disk_bytes, resolved.path)

    @property
    def memory(self) -> AdapterMemory:
        """The tiers' bytes, summed over the ranks, as the last load or unload reported."""
        return self._loader.memory

    def set_memory(self, memory: AdapterMemory) -> None:
        self._loader.memory = memory

    async def _load(self, entry: AdapterEntry) -> None:
        assert entry.path is not None
        await self._make_known_room(entry)
        while True:
            slot = await self._take_slot(entry)
            generation = next(self._generations)
            try:
                loaded = await self._loader.load(slot, generation, entry.name, entry.path)
                break
            except AdapterMemoryFullError as e:
                await self._make_room(entry, e.reason)
            except AdapterLoadFailedError:
                self._metrics.load(entry.kind, ok=False)
                raise
        entry.info, entry.residency, entry.in_host = loaded.info, Residency(slot, generation), False
        self._metrics.load(entry.kind, ok=True, seconds=loaded.seconds)
        log.info(
            "Loaded adapter %s (%s) into slot %d as generation %d from %s in %.3f s",
            entry.name,
            entry.kind,
            slot,
            generation,
            loaded.tier,
            loaded.seconds,
        )

    def _failed(self, entry: AdapterEntry, error: Exception) -> None:
        """A load failed: the entry is forgotten (it resolves anew next time) unless the load route
        registered it and it loaded before; the failure is remembered unless it is cheap to find again."""
        if not (entry.kind == "route" and entry.info is not None) and self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        route_first_load = entry.kind == "route" and entry.info is None  # its caller hears of it
        if not route_first_load and not isinstance(error, _NOT_REMEMBERED):
            now = time.monotonic()
            while self._failures and next(iter(self._failures.values()))[0] <= now:  # oldest first
                del self._failures[next(iter(self._failures))]
            key = (entry.name, entry.source)
            self._failures.pop(key, None)
            self._failures[key] = (now + FAILURE_MEMORY_S, error)
        self._notify()

    def _raise_remembered(self, key: tuple[str, str | None]) -> None:
        remembered = self._failures.get(key)
        if remembered is not None:
            if remembered[0] > time.monotonic():
                raise remembered[1]
            del self._failures[key]

    # ---- slots ------------------------------------------------------------------------------------

    async def _take_slot(self, entry: AdapterEntry) -> int:
        """A slot for `entry`: free, else evicted, else waited for."""
        while True:
            slot = self.slots.take()
            if slot is not None:
                return slot
            victim = self._victim()
            if victim is not None:
                await self._evict(victim)
                continue
            pinned = sum(1 for e in self._entries.values() if e.pinned and e is not entry and e.residency)
            if pinned >= self.slots.total:
                raise AdapterCapacityError(entry.name, self.slots.total)
            changed = self._changed
            await changed.wait()

    async def _make_known_room(self, entry: AdapterEntry) -> None:
        """An adapter loaded before (its size known) that the pools cannot hold now: evict idle adapters
        first, so the load is not a refused round trip through the ranks' step queues, then an eviction,
        then the load again (each waits for a step). An estimate (the pools allocate whole pages):
        `_make_room` still handles a refusal."""
        if entry.info is None:
            return
        need = entry.info.weight_bytes * self._loader.client.world_size  # the memory is summed over ranks
        while self.memory.pool_total - self.memory.pool_used < need:
            victim = self._victim()
            if victim is None:
                return
            await self._evict(victim)

    async def _make_room(self, entry: AdapterEntry, reason: str) -> None:
        """The pools had no room for `entry`: evict an idle adapter, else wait for one to become idle
        (or for another load or unload to settle); raise AdapterCapacityError if none ever can."""
        victim = self._victim()
        if victim is not None:
            await self._evict(victim)
            return
        could_free = [
            e
            for e in [*self._entries.values(), *self._draining]
            if e is not entry and (e.load_task is not None or (e.residency is not None and not e.pinned))
        ]
        if not could_free and not self._emptying:
            raise AdapterCapacityError(entry.name, self.slots.total, reason)
        changed = self._changed
        await changed.wait()

    def _victim(self) -> AdapterEntry | None:
        """The least recently used resident adapter that is not pinned and has no refs."""
        candidates = [
            e
            for e in self._entries.values()
            if e.residency is not None and not e.pinned and e.refs == 0 and e.load_task is None
        ]
        return min(candidates, key=lambda e: e.lru, default=None)

    async def _evict(self, entry: AdapterEntry) -> None:
        assert entry.residency is not None
        residency, entry.residency = entry.residency, None
        self._metrics.evicted()
        log.info("evicting adapter %r from slot %d", entry.name, residency.slot)
        self._emptying[residency.slot] = entry
        await self._loader.empty(residency.slot, residency.generation, keep=True)

    async def _empty_removed(self, entry: AdapterEntry) -> None:
        assert entry.residency is not None
        residency, entry.residency = entry.residency, None
        try:
            await self._loader.empty(residency.slot, residency.generation)
        finally:
            self._draining = [e for e in self._draining if e is not entry]

    def _drop(self, entry: AdapterEntry) -> None:
        """A lease was released."""
        assert entry.refs > 0, entry.name
        entry.refs -= 1
        entry.used(next(self._ticks))
        if entry.refs == 0:
            self._settle(entry)

    def _settle(self, entry: AdapterEntry) -> None:
        """`entry` has no refs or no load any more: empty its slot if it was unloaded, else let whoever
        waits for a slot look again (it may be evicted now)."""
        if entry.refs or entry.load_task is not None:
            return
        if not entry.removed:
            self._notify()
        elif entry.residency is not None:
            self._spawn(self._empty_removed(entry))
        else:
            self._draining = [e for e in self._draining if e is not entry]

    def _slot_emptied(self, slot: int) -> None:
        self._emptying.pop(slot, None)
        self.slots.give_back(slot)
        self._notify()

    def _unloaded(self, slot: int, kept: bool, dropped: list[str]) -> None:
        """Every rank emptied `slot`; `kept`: its adapter is in their host tiers now, which dropped the
        adapters named `dropped` to make room."""
        for name in dropped:
            other = self._entries.get(name)
            if other is not None and other.residency is None:
                other.in_host = False
        entry = self._emptying.get(slot)
        if entry is not None:
            entry.in_host = kept
            if kept and entry.removed:  # unloaded while its eviction ran: free the copy too
                entry.in_host = False
                self._spawn(self._loader.drop_host_copy(entry.name))

    def _notify(self) -> None:
        """Wake whoever waits for a slot to be freed (they look again)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _disk_bytes(path: Path) -> int:
    """The adapter files' size (0 for those missing)."""
    total = 0
    for name in ADAPTER_FILES:
        with contextlib.suppress(OSError):
            total += os.stat(path / name).st_size
    return total
