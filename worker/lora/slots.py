"""What each adapter slot of one rank holds, and the rules that keep a row from reading the wrong weights.

A slot is a number the router gives a loaded adapter (1..num_slots; 0 is "no adapter"); it reserves no
memory: the adapter's rows live in the adapter pool at their true size (`worker/lora/pool.py`), and a
load that does not fit fails with AdapterMemoryError and changes nothing, so the router can evict
another adapter and try again.

The router numbers every load with a `generation` (> 0, never reused). The worker records the
generation of the load that filled each slot and refuses:
- a load into an occupied slot (the router unloads first: replacing in place is how a previous
  adapter's weights leak into requests meant for the next one);
- an unload whose generation is not the slot's (a stale unload must not empty a reload), or of a slot
  that running sequences still use;
- a row whose adapter generation is not its slot's (the slot was emptied or reloaded since the router
  looked), checked for new rows and again for running ones on every step.

Loading is split in two so that reading a file never holds up the steps: `prepare_adapter` (sharding,
scaling, casting; changes nothing, so it runs on a loader thread) and `AdapterSlots.place` (copying
into the pool, on the step thread between steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from worker.errors import RequestError
from worker.lora.adapter import LoraAdapter
from worker.lora.packed import Key, ModuleFactors, PackedFactors
from worker.lora.pages import PoolFullError
from worker.lora.pool import AdapterPool, AdapterRows
from worker.lora.sites import LoraSite


class AdapterMemoryError(RequestError):
    """The adapter pool has no room for an adapter now (RESOURCE_EXHAUSTED): nothing was changed."""


@dataclass(frozen=True)
class AdapterFacts:
    """What the router and the row checks need to know of an adapter; not its weights."""

    name: str
    lora_rank: int  # max r over its modules
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    weight_bytes: int  # its A and B elements on this rank x the pool's element size (its true size)


@dataclass(frozen=True)
class ResidentAdapter(AdapterFacts):
    """An adapter as its slot holds it."""

    generation: int  # of the load that put it there


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter converted and sharded for this rank's pool, ready for `AdapterSlots.place`."""

    facts: AdapterFacts
    packed: PackedFactors  # its rows, one block per pool row width

    @property
    def nbytes(self) -> int:
        return self.facts.weight_bytes

    @property
    def factors(self) -> dict[Key, ModuleFactors]:
        """Each (layer, module)'s factors, as views into the packed blocks."""
        return self.packed.factors()


def prepare_adapter(
    adapter: LoraAdapter, sites: list[LoraSite], dtype: torch.dtype, max_lora_rank: int, pin: bool
) -> PreparedAdapter:
    """Shard, scale and cast `adapter` for the model's LoRA `sites`, on the host, in the pool `dtype`,
    packed as the pool stores it. Reads only the sites' fixed layout, so it may run on any thread, or in
    the loader process. `pin`: page-locked (for a GPU)."""
    if adapter.lora_rank > max_lora_rank:
        raise RequestError(
            f"adapter {adapter.name!r}: LoRA rank {adapter.lora_rank} exceeds the maximum LoRA rank "
            f"{max_lora_rank} (raise MAX_LORA_RANK)"
        )
    factors: dict[Key, ModuleFactors] = {}
    for site in sites:
        weights = {p.module: adapter.weights.get((site.layer, p.module)) for p in site.parts}
        weights = {m: w for m, w in weights.items() if w is not None}
        factors.update(site.factors(weights))
    packed = PackedFactors.pack(factors, dtype)
    facts = AdapterFacts(
        name=adapter.name,
        lora_rank=adapter.lora_rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=adapter.target_modules,
        weight_bytes=packed.nbytes,
    )
    return PreparedAdapter(facts, packed.pinned() if pin else packed)


class AdapterSlots:
    """Slots 1..num_slots, the adapter pool their adapters' rows are in, and each slot's generation."""

    def __init__(self, num_slots: int, pool: AdapterPool | None):
        self.num_slots = num_slots  # adapter slots; slot 0 is "no adapter"
        self.pool = pool  # None without LoRA (num_slots 0)
        self.resident: dict[int, ResidentAdapter] = {}  # slot -> the adapter in it
        self.rows: dict[int, AdapterRows] = {}  # slot -> its adapter's rows in the pool

    def check_slot(self, slot: int, what: str) -> None:
        """Refuse a slot number outside 1..num_slots; `what` names the caller's subject."""
        if not 1 <= slot <= self.num_slots:
            has = f"slots 1..{self.num_slots}" if self.num_slots else "no adapter slots (max_adapters is 0)"
            raise RequestError(f"{what}: slot {slot} is not an adapter slot; this worker has {has}")

    def check_load(self, slot: int, generation: int, name: str) -> None:
        """What a load can be refused for before its file is read (the slot's number, the generation)."""
        self.check_slot(slot, f"adapter {name!r}")
        if generation == 0:
            raise RequestError(
                f"adapter {name!r}: generation 0 is not a load generation (the router counts loads from 1)"
            )

    def place(self, slot: int, generation: int, prepared: PreparedAdapter) -> ResidentAdapter:
        """Copy `prepared` into the pool for the empty `slot` as load `generation` (on the step thread:
        the pool is what the steps read). AdapterMemoryError, and nothing changed, when it does not fit."""
        name = prepared.facts.name
        self.check_load(slot, generation, name)
        held = self.resident.get(slot)
        if held is not None:
            raise RequestError(
                f"adapter {name!r}: slot {slot} already holds adapter {held.name!r} (generation "
                f"{held.generation}); unload it first"
            )
        assert self.pool is not None
        try:
            with torch.no_grad():
                self.rows[slot] = self.pool.place(prepared.packed)
        except PoolFullError as e:
            raise AdapterMemoryError(f"adapter {name!r}: {e} (ADAPTER_MEMORY bounds the pool)") from e
        self.resident[slot] = ResidentAdapter(**asdict(prepared.facts), generation=generation)
        return self.resident[slot]

    def unload(
        self, slot: int, generation: int, users: list[int], keep: bool = False
    ) -> tuple[ResidentAdapter, PreparedAdapter | None]:
        """Empty `slot`, which must hold load `generation` and have no `users` (running request ids).
        With `keep`, also return its adapter read back from the pool, for the host tier."""
        what = f"unload of slot {slot} generation {generation}"
        self.check_slot(slot, what)
        held = self.resident.get(slot)
        if held is None:
            raise RequestError(f"{what}: the slot is empty")
        if held.generation != generation:
            raise RequestError(
                f"{what}: the slot holds adapter {held.name!r} generation {held.generation} (a stale unload?)"
            )
        if users:
            raise RequestError(
                f"{what}: adapter {held.name!r} is still used by running requests {sorted(users)}; release "
                "them first"
            )
        assert self.pool is not None
        kept = None
        with torch.no_grad():
            rows = self.rows.pop(slot)
            if keep:
                facts = {f.name: getattr(held, f.name) for f in fields(AdapterFacts)}
                pin = self.pool.device.type == "cuda"
                kept = PreparedAdapter(AdapterFacts(**facts), self.pool.read(rows, pin=pin))
            self.pool.release(rows)  # NaN-filled, then free: nothing can read them now
        return self.resident.pop(slot), kept

    def check_row(self, request_id: int, slot: int, generation: int, running: bool = False) -> None:
        """Refuse a row of `request_id` unless `slot` holds load `generation` (slot 0: generation 0).
        `running`: the row of a sequence already prefilled with that generation."""
        if slot == 0:
            if generation != 0:
                raise RequestError(
                    f"request {request_id}: lora_slot 0 (no adapter) needs adapter_generation 0, got "
                    f"{generation}"
                )
            return
        held = self.resident.get(slot)
        if held is not None and held.generation == generation:
            return
        now = "no adapter" if held is None else f"adapter {held.name!r} generation {held.generation}"
        if running:
            raise RequestError(
                f"request {request_id}: prefilled with generation {generation} of slot {slot}, but the slot "
                f"now holds {now}; refusing to run it with other weights"
            )
        if held is None:
            raise RequestError(
                f"request {request_id}: no adapter is loaded in slot {slot} (the request expects generation "
                f"{generation})"
            )
        raise RequestError(
            f"request {request_id}: slot {slot} holds {now}, but the request expects generation {generation}"
        )
