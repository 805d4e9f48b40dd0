"""Logical KV blocks: which of the workers' `num_blocks` blocks each sequence owns (plain Python).

Policy (the scheduler's, see router/scheduler.py): blocks on demand. A sequence holds blocks for the
tokens its next step leaves in the cache, rounded up to whole blocks: that rounding is its look-ahead
(up to `block_size - 1` tokens), so it asks for one more block once every `block_size` steps. When the
pool runs out the scheduler preempts a sequence, which returns all its blocks; a finished or cancelled
one returns them too. Nothing here knows about sequences: it hands out and takes back block ids.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest ids first, so a fresh start hands out 0, 1, 2, ... (easier to read in logs and tests).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Fresh blocks for `num_tokens` tokens."""
        return self._take(self.blocks_for(num_tokens))

    def missing(self, blocks: list[int], num_tokens: int) -> int:
        """How many more blocks `blocks` needs to hold `num_tokens` tokens."""
        return max(self.blocks_for(num_tokens) - len(blocks), 0)

    def grow(self, blocks: list[int], num_tokens: int) -> None:
        """Append to `blocks` (a sequence's table, in place) until it holds `num_tokens` tokens."""
        blocks.extend(self._take(self.missing(blocks, num_tokens)))

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "a block was freed twice"

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} blocks requested, {len(self._free)} free")
        blocks = self._free[-n:][::-1] if n else []
        del self._free[len(self._free) - n :]
        return blocks
