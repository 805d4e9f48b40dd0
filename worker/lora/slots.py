"""What each adapter slot of one rank holds, and the rules that keep a row from reading the wrong weights.

The router decides which adapter goes into which slot and numbers every load with a `generation` (> 0,
never reused). The worker records the generation of the load that filled each slot and refuses:
- a load into an occupied slot (the router unloads first: replacing in place is how a previous
  adapter's weights leak into requests meant for the next one);
- an unload whose generation is not the slot's (a stale unload must not empty a reload), or of a slot
  that running sequences still use;
- a row whose adapter generation is not its slot's (the slot was emptied or reloaded since the router
  looked), checked for new rows and again for running ones on every step.

Loading is split in two so that reading a file never holds up the steps: `prepare_adapter` (sharding,
scaling, casting; changes nothing, so it runs on a loader thread) and `AdapterSlots.place` (copying
into the stacks, on the step thread between steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from worker.errors import RequestError
from worker.lora.adapter import LoraAdapter
from worker.lora.stacks import LoraStack, SlotWeights


@dataclass(frozen=True)
class AdapterFacts:
    """What the router and the row checks need to know of an adapter; not its weights."""

    name: str
    lora_rank: int  # max r over its modules
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    weight_bytes: int  # its A and B elements on this rank x the stacks' element size


@dataclass(frozen=True)
class ResidentAdapter(AdapterFacts):
    """An adapter as its slot holds it."""

    generation: int  # of the load that put it there


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter converted and sharded for this rank's stacks, ready for `AdapterSlots.place`."""

    facts: AdapterFacts
    stacks: tuple[tuple[SlotWeights, ...], ...]  # per layer, per stack of that layer (lora_stacks())


def prepare_adapter(
    adapter: LoraAdapter, layer_stacks: list[list[LoraStack]], max_lora_rank: int
) -> PreparedAdapter:
    """Shard, scale and cast `adapter` for `layer_stacks` (each layer's `lora_stacks()`), on the host.
    Reads only the stacks' fixed layout (parts, shapes, dtype), so it may run on any thread."""
    if adapter.lora_rank > max_lora_rank:
        raise RequestError(
            f"adapter {adapter.name!r}: LoRA rank {adapter.lora_rank} exceeds the maximum LoRA rank "
            f"{max_lora_rank} (raise MAX_LORA_RANK)"
        )
    prepared, num_elements, element_size = [], 0, 0
    for i, stacks in enumerate(layer_stacks):
        layer = []
        for stack in stacks:
            weights = {m: adapter.weights[(i, m)] for m in stack.modules if (i, m) in adapter.weights}
            # Pinned on a GPU, so that placing it is an asynchronous copy on the step's stream.
            slot_weights = stack.prepare(weights, pin=stack.lora_a_stack.is_cuda)
            layer.append(slot_weights)
            num_elements += slot_weights.num_elements
            element_size = stack.lora_a_stack.element_size()
        prepared.append(tuple(layer))
    facts = AdapterFacts(
        name=adapter.name,
        lora_rank=adapter.lora_rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=adapter.target_modules,
        weight_bytes=num_elements * element_size,
    )
    return PreparedAdapter(facts, tuple(prepared))


class AdapterSlots:
    """Slots 1..num_slots of every layer's stacks, and the load generation each one holds."""

    def __init__(self, num_slots: int, layer_stacks: list[list[LoraStack]]):
        self.num_slots = num_slots  # adapter slots; slot 0 is "no adapter"
        self.layer_stacks = layer_stacks
        self.resident: dict[int, ResidentAdapter] = {}  # slot -> the adapter in it

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
        """Copy `prepared` into the empty `slot` as load `generation` (on the step thread: the stacks
        are what the steps read)."""
        name = prepared.facts.name
        self.check_load(slot, generation, name)
        held = self.resident.get(slot)
        if held is not None:
            raise RequestError(
                f"adapter {name!r}: slot {slot} already holds adapter {held.name!r} (generation "
                f"{held.generation}); unload it first"
            )
        assert len(prepared.stacks) == len(self.layer_stacks), "prepared for another model"
        with torch.no_grad():
            for stacks, weights in zip(self.layer_stacks, prepared.stacks, strict=True):
                for stack, slot_weights in zip(stacks, weights, strict=True):
                    stack.place(slot, slot_weights)
        self.resident[slot] = ResidentAdapter(**asdict(prepared.facts), generation=generation)
        return self.resident[slot]

    def unload(self, slot: int, generation: int, users: list[int]) -> ResidentAdapter:
        """Empty `slot`, which must hold load `generation` and have no `users` (running request ids)."""
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
        with torch.no_grad():
            for stacks in self.layer_stacks:
                for stack in stacks:
                    stack.clear_slot(slot)
        return self.resident.pop(slot)

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
