"""The sequences waiting to be admitted, and the admission rule (plain Python).

Waiting sequences are kept per client, (tenant, adapter) (router/fairness.py), each client's in arrival
order. `next_batch` admits one sequence at a time while budgets allow: first the re-queued ones
(`push_front`, in order, never charged again), then the head of the client the fairness ledger ranks
lowest among those whose head fits every budget (`_reserve`: batch size, tokens per prefill, KV tokens
the whole running batch may hold, free KV blocks); each admission charges its prompt at once,
so one batch is shared fairly too. Work-conserving: a client whose head does not fit is passed over,
but only while the others are less than `overtake_slack` ahead of it, so a large request is admitted as
soon as it fits and cannot be starved by small ones; within a client nobody is overtaken.

A cap bounds each adapter's waiting sequences (`max_queued_per_adapter`): `check_room` raises a 429
naming the adapter, so one adapter's backlog cannot fill the whole queue. Admitted sequences get their
KV blocks here (`_start`): blocks on demand, so only those its prefill writes (the prompt, or for a
re-queued one the prompt plus what it generated); the scheduler adds blocks as it grows. Whether a
sequence fits is decided in `_reserve` alone.

Chunked prefill (`chunk_over`, the scheduler's whole per-step prefill budget): a prefill longer than a
step's whole budget can never fit one, so it is admitted with a first chunk of whatever the step's
budget has left (and only that chunk's blocks); the scheduler feeds it the rest chunk by chunk. A
prefill that fits a step's budget is never split: it waits for a step with room for it whole.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

from router.block_manager import BlockManager
from router.errors import AdapterQueueFullError
from router.fairness import Client, FairnessLedger
from router.sequence import Sequence, Status


@dataclass
class _Budget:
    """What the batch being admitted may still take."""

    seats: int | None  # None: no batch-size limit
    prefill_tokens: int
    held_tokens: int  # KV tokens (whole blocks) the running batch may still take
    free_blocks: int
    prefill_empty: bool = True  # nothing taken yet: a recompute may then exceed prefill_tokens
    chunk_over: int | None = None  # prefills longer than this are admitted in chunks (None: never)


class RequestQueue:
    def __init__(
        self,
        blocks: BlockManager,
        ledger: FairnessLedger | None = None,
        *,
        max_queued_per_adapter: int | None = None,
        overtake_slack: float = math.inf,
    ):
        self._blocks = blocks
        self.ledger = ledger or FairnessLedger()
        self._max_queued_per_adapter = max_queued_per_adapter
        self._overtake_slack = overtake_slack
        self._front: deque[Sequence] = deque()  # re-queued (preempted) sequences, admitted first
        self._waiting: dict[Client, deque[Sequence]] = {}
        self._queued_by_adapter: Counter[str] = Counter()
        self._admissions = itertools.count(1)

    def __len__(self) -> int:
        return len(self._front) + sum(len(q) for q in self._waiting.values())

    def __iter__(self) -> Iterator[Sequence]:
        """The re-queued ones first, then everyone else in arrival order."""
        waiting = sorted((s for q in self._waiting.values() for s in q), key=lambda s: s.id)
        return iter([*self._front, *waiting])

    def queued_by_adapter(self) -> dict[str, int]:
        """Waiting sequences per adapter (the re-queued ones not counted)."""
        return {adapter: n for adapter, n in self._queued_by_adapter.items() if n}

    def check_room(self, adapter: str, count: int) -> None:
        """Raise AdapterQueueFullError (429) unless `adapter` may queue `count` more sequences."""
        cap = self._max_queued_per_adapter
        if cap is not None and self._queued_by_adapter[adapter] + count > cap:
            raise AdapterQueueFullError(adapter, cap)

    def append(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of its client's line (callers `check_room` first)."""
        client = seq.fair_client
        if client not in self._waiting:
            self.ledger.arrive(client, self._waiting.keys())
            self._waiting[client] = deque()
        self._waiting[client].append(seq)
        self._queued_by_adapter[client[1]] += 1

    def push_front(self, seq: Sequence) -> None:
        """Re-queue a sequence that was running (preempted) to be admitted before anything else, the last
        pushed first; its prompt was charged when it was first admitted, so it is not charged again."""
        seq.status = Status.WAITING
        self._front.appendleft(seq)

    def remove(self, seq: Sequence) -> bool:
        if seq in self._front:
            self._front.remove(seq)
            return True
        line = self._waiting.get(seq.fair_client)
        if line is None or seq not in line:
            return False
        line.remove(seq)
        self._queued_by_adapter[seq.fair_client[1]] -= 1
        if not line:
            self._forget(seq.fair_client)
        return True

    def next_batch(
        self,
        *,
        min_size: int,
        max_size: int | None,
        prefill_budget: int,
        token_budget: int,
        chunk_over: int | None = None,
    ) -> list[Sequence]:
        """Admit the re-queued, then the fairest fitting heads; none at all if fewer than `min_size` fit.
        `token_budget` is in KV tokens the admitted may hold (whole blocks), see `_reserve`; prefills
        longer than `chunk_over` are admitted with a first chunk (`Sequence.chunk_end`)."""
        self._drop_cancelled()
        budget = _Budget(max_size, prefill_budget, token_budget, self._blocks.num_free, chunk_over=chunk_over)
        front = []
        for seq in self._front:
            if not self._reserve(seq, budget):
                break
            front.append(seq)
        fair: list[Sequence] = []
        # A re-queued sequence that does not fit holds back everyone else: they would take its blocks.
        if len(front) == len(self._front):
            fair = self._pick_fair(budget)
        batch = front + fair
        if not batch or len(batch) < min_size:
            for seq in fair:
                self.ledger.charge(seq.fair_client, prompt=-seq.prompt_len)  # the charge is undone
            return []
        for _ in front:
            self._front.popleft()
        for seq in fair:
            self.remove(seq)
        now = time.monotonic()
        for seq in batch:
            self._start(seq, now)
        return batch

    def _pick_fair(self, budget: _Budget) -> list[Sequence]:
        """Heads in fairness order, each charged its prompt as it is picked (the queue is not changed)."""
        picked: list[Sequence] = []
        taken: Counter[Client] = Counter()
        while budget.seats is None or budget.seats > 0:
            heads = [
                (self.ledger.rank(c), line[taken[c]].id, c)
                for c, line in self._waiting.items()
                if taken[c] < len(line)
            ]
            seq = None
            stalled: list[Client] = []
            for _, _, client in sorted(heads):
                if any(not self.ledger.may_overtake(client, s, self._overtake_slack) for s in stalled):
                    break
                head = self._waiting[client][taken[client]]
                if self._reserve(head, budget):
                    seq = head
                    break
                stalled.append(client)
            if seq is None:
                break
            taken[seq.fair_client] += 1
            self.ledger.charge(seq.fair_client, prompt=seq.prompt_len)
            picked.append(seq)
        return picked

    def _reserve(self, seq: Sequence, budget: _Budget) -> bool:
        """The one place that decides whether `seq` fits what the batch may still take (and takes it).

        It takes the blocks its prefill writes in this step: `num_tokens` (no room for max_new_tokens:
        blocks come on demand), or with chunking its first chunk's. Without chunking, a re-queued
        recompute may be longer than the prefill budget, since validation bounds only prompts; it then
        goes alone."""
        chunked = budget.chunk_over is not None and seq.num_tokens > budget.chunk_over
        prefill = min(seq.num_tokens, budget.prefill_tokens) if chunked else seq.num_tokens
        recompute_alone = not chunked and seq.num_generated > 0 and budget.prefill_empty
        blocks = self._blocks.blocks_for(prefill)
        fits = (
            (budget.seats is None or budget.seats >= 1)
            and (0 < prefill <= budget.prefill_tokens or recompute_alone)
            and blocks * self._blocks.block_size <= budget.held_tokens
            and blocks <= budget.free_blocks
        )
        if fits:
            if budget.seats is not None:
                budget.seats -= 1
            budget.prefill_tokens -= prefill
            seq.chunk_end = prefill
            budget.held_tokens -= blocks * self._blocks.block_size
            budget.free_blocks -= blocks
            budget.prefill_empty = False
        return fits

    def _start(self, seq: Sequence, now: float) -> None:
        seq.blocks = self._blocks.allocate(seq.chunk_end)
        seq.prefilled = 0
        seq.prefilling = True
        seq.blocks_sent = 0
        seq.status = Status.RUNNING
        seq.admission = next(self._admissions)
        if seq.admitted_at is None:
            seq.admitted_at = now

    def _drop_cancelled(self) -> None:
        lines = [self._front, *self._waiting.values()]
        for seq in [s for line in lines for s in line if s.cancelled]:
            self.remove(seq)

    def _forget(self, client: Client) -> None:
        del self._waiting[client]
        self.ledger.leave(client, self._waiting.keys())
