"""Logical KV blocks: which of the workers' `num_blocks` blocks each sequence owns (plain Python).

Policy: a sequence gets every block it can ever need (prompt + max_new_tokens) when it is admitted, and
returns them all when it finishes or is cancelled. A running sequence therefore never runs out of cache
and nothing is ever preempted; the price is that short outputs under a large max_new_tokens hold blocks
they do not use.
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
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"{n} blocks requested, {len(self._free)} free")
        blocks = self._free[-n:][::-1] if n else []
        del self._free[len(self._free) - n :]
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "a block was freed twice"
