"""The capacity adapters spend on the workers: today a fixed number of slots (InfoResponse.num_adapter_slots),
each holding one adapter of any LoRA rank up to max_lora_rank.

The registry's policy talks to capacity only through `fits`, `take` and `give_back`, so that a byte
budget (a paged pool, where an adapter needs its own size) can replace the slots without the policy
changing: `fits` then asks for the adapter's bytes, and `take` returns where they were placed.
"""

from __future__ import annotations


class SlotPool:
    """Slots 1..num_slots (0 is the base model); `take` hands out the lowest free one."""

    def __init__(self, num_slots: int):
        self.total = num_slots
        self._free = set(range(1, num_slots + 1))

    @property
    def used(self) -> int:
        """Slots taken: holding an adapter, being loaded or emptied, or kept out after a failed unload."""
        return self.total - len(self._free)

    def fits(self) -> bool:
        """Whether `take` would succeed now."""
        return bool(self._free)

    def take(self) -> int | None:
        """A free slot, now taken; None when none is free."""
        if not self._free:
            return None
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def give_back(self, slot: int) -> None:
        """`slot` is empty on every rank again."""
        assert 1 <= slot <= self.total and slot not in self._free, slot
        self._free.add(slot)
