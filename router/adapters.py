"""What the adapter registry (router/adapter_registry.py) knows about each adapter, the lease a request
holds on one, and the registry's errors.

An adapter is an entry under its name. Its state: `loading` (one load in flight, which every request for
it awaits), `resident` (in a worker slot, as load `generation`), `not_resident` (registered, loaded again
on its next request) or `unloading` (its name is gone; its slot empties once nothing uses it). `refs`
counts the requests and sequences holding a lease on it: an adapter with refs is never evicted or
unloaded, so a lease's slot and generation stay valid until it is released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from proto import generate_pb2 as pb

# Where an adapter came from: LORA_ADAPTERS, POST /v1/load_lora_adapter, or a first request resolved in
# the adapter roots, the HF cache or by a Hub download (router/adapter_resolver.py).
SourceKind = Literal["startup", "route", "root", "hf-cache", "hub-download"]
State = Literal["loading", "resident", "not_resident", "unloading"]


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded at startup; the message names it."""


class UnknownAdapterError(KeyError):
    """A name the registry does not hold (the unload route)."""

    def __init__(self, adapter_id: str):
        super().__init__(adapter_id)
        self.adapter_id = adapter_id


class AdapterExistsError(Exception):
    """The load route named an adapter that is already registered (or a name of the base model)."""

    def __init__(self, adapter_id: str, message: str):
        super().__init__(message)
        self.adapter_id = adapter_id


class AdapterLoadFailedError(Exception):
    """A rank refused or failed LoadAdapter; `reason` is the worker's message. `refused` is True when
    the worker refused the adapter itself (invalid, wrong base model, corrupt), False when the worker
    failed (unreachable, internal error)."""

    def __init__(self, adapter_id: str, reason: str, refused: bool):
        super().__init__(f"adapter {adapter_id!r} could not be loaded: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason
        self.refused = refused


class AdapterCapacityError(Exception):
    """No room can ever be made for the adapter: every slot, or the adapter memory, holds pinned adapters
    only (or there are no slots). `memory_reason`: the pools' refusal, when memory is what is short."""

    def __init__(self, adapter_id: str, num_slots: int, memory_reason: str | None = None):
        if memory_reason is not None:
            held = f"{memory_reason}, and every adapter resident is pinned"
            raise_it = "raise ADAPTER_MEMORY"
        else:
            held = (
                f"all {num_slots} adapter slots hold pinned adapters"
                if num_slots
                else "there are no adapter slots"
            )
            raise_it = "raise MAX_LORA_ADAPTERS"
        super().__init__(
            f"adapter {adapter_id!r} cannot be loaded: {held}; {raise_it} (or unload a pinned adapter)"
        )
        self.adapter_id = adapter_id


class AdapterMemoryFullError(Exception):
    """The ranks' adapter pools have no room for the adapter now (they changed nothing): the registry
    makes room and loads it again."""

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(reason)
        self.adapter_id = adapter_id
        self.reason = reason


@dataclass(frozen=True)
class AdapterMemory:
    """The adapter tiers' bytes, summed over the ranks (each holds its shard), as last reported."""

    pool_used: int = 0
    pool_total: int = 0
    host_used: int = 0
    host_total: int = 0

    @classmethod
    def of(cls, replies) -> AdapterMemory:
        """From the `memory` field of each rank's reply (LoadAdapter, UnloadAdapter or Info)."""
        ms = [r.adapter_memory if isinstance(r, pb.InfoResponse) else r.memory for r in replies]
        return cls(
            sum(m.pool_bytes_used for m in ms),
            sum(m.pool_bytes_total for m in ms),
            sum(m.host_bytes_used for m in ms),
            sum(m.host_bytes_total for m in ms),
        )


@dataclass(frozen=True)
class AdapterInfo:
    """What rank 0 reported when the adapter was loaded."""

    lora_rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    weight_bytes: int  # on rank 0 (each rank holds its shard)


@dataclass(frozen=True)
class Residency:
    slot: int
    generation: int


@dataclass(eq=False)
class AdapterEntry:
    name: str
    kind: SourceKind
    origin: str
    """What the user wrote: the LORA_ADAPTERS source, the load route's lora_path, or the request's id."""
    pinned: bool
    source: str | None = None
    """The `adapter_source` of the request that registered it (None: the load route, LORA_ADAPTERS)."""
    path: Path | None = None
    """The local PEFT directory; None until a first load resolved it."""
    revision: str | None = None
    disk_bytes: int = 0
    info: AdapterInfo | None = None
    """From the last load; kept while not resident."""
    residency: Residency | None = None
    in_host: bool = False  # the ranks' host tier kept its weights when it left the pool (as last reported)
    load_task: asyncio.Task | None = None
    refs: int = 0
    lru: int = 0  # the registry's use counter when last acquired or released: eviction order
    last_used: float | None = None  # unix time
    removed: bool = False  # unloaded: no longer routable, emptied once refs reach 0
    failed: tuple[float, Exception] | None = None  # (monotonic deadline, error) of its last failed load

    @property
    def state(self) -> State:
        if self.load_task is not None:
            return "loading"
        if self.removed:
            return "unloading"
        return "resident" if self.residency is not None else "not_resident"

    def used(self, tick: int) -> None:
        self.lru = tick
        self.last_used = time.time()


class AdapterLease:
    """One reference to a resident adapter; `slot` and `generation` are the ones its rows must name.

    `release` is idempotent; `clone` takes one more reference (each sequence holds its own)."""

    __slots__ = ("_drop", "_released", "entry", "generation", "slot")

    def __init__(self, entry: AdapterEntry, drop: Callable[[AdapterEntry], None]):
        assert entry.residency is not None and entry.refs > 0
        self.entry = entry
        self.slot = entry.residency.slot
        self.generation = entry.residency.generation
        self._drop = drop
        self._released = False

    @property
    def id(self) -> str:
        return self.entry.name

    def clone(self) -> AdapterLease:
        assert not self._released, "clone of a released lease"
        self.entry.refs += 1
        return AdapterLease(self.entry, self._drop)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._drop(self.entry)
