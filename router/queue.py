"""The FIFO of sequences waiting to be admitted, and the admission rule (plain Python).

`next_batch` takes sequences from the front while each one fits every budget: batch size, prompt
tokens per prefill, reserved tokens of the whole running batch, and free KV blocks. The first sequence
that does not fit stops admission (no skipping ahead), so a long request is never starved by short ones
behind it. Admitted sequences get their blocks here.
"""

from __future__ import annotations

import time
from collections import deque

from router.block_manager import BlockManager
from router.sequence import Sequence, Status


class RequestQueue:
    def __init__(self, blocks: BlockManager):
        self._blocks = blocks
        self._entries: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def append(self, seq: Sequence) -> None:
        self._entries.append(seq)

    def remove(self, seq: Sequence) -> bool:
        try:
            self._entries.remove(seq)
        except ValueError:
            return False
        return True

    def next_batch(
        self,
        *,
        min_size: int,
        max_size: int | None,
        prefill_budget: int,
        token_budget: int,
    ) -> list[Sequence]:
        """Admit sequences from the front; none at all if fewer than `min_size` would fit."""
        while self._entries and self._entries[0].cancelled:
            self._entries.popleft()
        batch: list[Sequence] = []
        prefill_tokens = reserved_tokens = blocks_needed = 0
        for seq in self._entries:
            if max_size is not None and len(batch) >= max_size:
                break
            if seq.cancelled:
                continue
            prefill_tokens += seq.prompt_len
            reserved_tokens += seq.num_tokens
            blocks_needed += self._blocks.blocks_for(seq.num_tokens)
            if (
                prefill_tokens > prefill_budget
                or reserved_tokens > token_budget
                or blocks_needed > self._blocks.num_free
            ):
                break
            batch.append(seq)
        if not batch or len(batch) < min_size:
            return []
        now = time.monotonic()
        for seq in batch:
            self._entries.remove(seq)
            seq.blocks = self._blocks.allocate(seq.num_tokens)
            seq.status = Status.RUNNING
            seq.admitted_at = now
        return batch
