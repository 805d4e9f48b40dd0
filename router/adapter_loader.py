"""Putting an adapter into a slot on every rank and emptying a slot on every rank (the registry decides
which and when; router/adapter_registry.py).

A load succeeds only when every rank acked. When any rank fails, the slot is emptied again on the ranks
that may hold the adapter (those that did not refuse it: a refusal comes before the rank changes any
state), so that no rank keeps weights the router does not know of; there, a rank refusing the unload
because its slot does not hold that generation (its load failed before the copy) has nothing to undo.
A slot is handed back (`on_empty`) only once every rank emptied it; an unload that fails is retried in
the background, and until it succeeds the slot stays out of use, so a later load never meets an
occupied slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto import generate_pb2 as pb
from router.adapters import AdapterInfo, AdapterLoadFailedError, AdapterMemory, AdapterMemoryFullError
from router.client import ShardedClient, WorkerError

log = logging.getLogger(__name__)

# A load reads local files (downloads happen in the router before it), so a rank silent for this long is
# broken; without a limit its waiting requests would wait forever.
LOAD_TIMEOUT_S = 300.0
UNLOAD_TIMEOUT_S = 30.0
# Delays between retries of a failed unload (a rank that missed a Release still runs a sequence in the
# slot, or was briefly unreachable); after the last one the slot stays out of use, logged as an error.
UNLOAD_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# Codes a rank answers before it changes any state (worker/server.py): it holds nothing to roll back.
# RESOURCE_EXHAUSTED: its adapter pool has no room now.
_REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@dataclass(frozen=True)
class Loaded:
    info: AdapterInfo
    seconds: float
    tier: str  # where rank 0 took it from: "host" or "disk"


class SlotLoader:
    def __init__(
        self,
        client: ShardedClient,
        on_empty: Callable[[int], None],
        on_unloaded: Callable[[int, bool, list[str]], None] = lambda slot, kept, dropped: None,
    ):
        self.client = client
        self._on_empty = on_empty
        self._on_unloaded = on_unloaded  # (slot, every rank's host tier kept it, names any rank dropped)
        self.memory = AdapterMemory()  # as the last reply reported
        self._retries: set[asyncio.Task] = set()

    async def load(self, slot: int, generation: int, name: str, path: Path) -> Loaded:
        """`name` from `path` into `slot` on every rank as `generation`; raises AdapterLoadFailedError
        (after the rollback has started; the slot comes back through `on_empty`), or
        AdapterMemoryFullError when every rank's pool lacks room (nothing changed; the slot is back)."""
        start = time.monotonic()
        replies = await self.client.load_adapter(slot, name, str(path), generation, timeout=LOAD_TIMEOUT_S)
        seconds = time.monotonic() - start
        errors = [r for r in replies if isinstance(r, WorkerError)]
        if not errors:
            reply: pb.LoadAdapterResponse = replies[0]
            info = AdapterInfo(
                lora_rank=reply.lora_rank,
                alpha=round(reply.alpha, 6),  # a float32 on the wire
                use_rslora=reply.use_rslora,
                target_modules=tuple(reply.target_modules),
                weight_bytes=reply.weight_bytes,
            )
            self.memory = AdapterMemory.of(replies)
            return Loaded(info, seconds, reply.tier or "disk")
        full = [e for e in errors if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        if len(full) == len(replies):
            self._on_empty(slot)  # no rank holds anything
            raise AdapterMemoryFullError(name, full[0].detail)
        refusals = [e for e in errors if _refused(e)]
        error = (refusals or errors)[0]
        log.warning("loading adapter %r into slot %d failed: %s", name, slot, error)
        holding = [rank for rank, r in enumerate(replies) if not _refused(r)]
        await self._empty(slot, generation, holding, rollback=True)
        raise AdapterLoadFailedError(name, str(error), refused=bool(refusals))

    async def empty(self, slot: int, generation: int, keep: bool = False) -> bool:
        """Unload `slot` (load `generation`) on every rank, into their host tiers with `keep` (an
        eviction); True when done, False when it is retried in the background (the slot comes back
        through `on_empty` either way)."""
        return await self._empty(slot, generation, range(self.client.world_size), keep=keep)

    async def drop_host_copy(self, name: str) -> None:
        """Free the ranks' host-tier copies of `name` (unloaded while out of the pool)."""
        replies = await self.client.drop_host_copy(name, timeout=UNLOAD_TIMEOUT_S)
        done = [r for r in replies if not isinstance(r, WorkerError)]
        for e in (r for r in replies if isinstance(r, WorkerError)):
            log.warning("dropping adapter %r from the host tier failed: %s", name, e)
        if len(done) == len(replies):
            self.memory = AdapterMemory.of(done)

    async def _empty(
        self, slot: int, generation: int, ranks: Sequence[int], rollback: bool = False, keep: bool = False
    ) -> bool:
        failed = await self._unload(slot, generation, ranks, rollback, keep)
        if not failed:
            self._on_empty(slot)
            return True
        retry = self._retry(slot, generation, failed, rollback)
        task = asyncio.create_task(retry, name=f"unload-slot-{slot}")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return False

    async def _unload(
        self, slot: int, generation: int, ranks: Sequence[int], rollback: bool, keep: bool = False
    ) -> list[int]:
        """The ranks of `ranks` that did not empty the slot (in a rollback, a refusal means the rank's
        slot never held `generation`)."""
        if not ranks:
            return []
        replies = await self.client.unload_adapter(
            slot, generation, ranks, timeout=UNLOAD_TIMEOUT_S, keep=keep
        )
        failed = []
        for rank, e in zip(ranks, replies, strict=True):
            if isinstance(e, WorkerError) and not (rollback and _refused(e)):
                log.warning("unloading slot %d (generation %d) failed: %s", slot, generation, e)
                failed.append(rank)
        done = [r for r in replies if not isinstance(r, WorkerError)]
        if done and not rollback and len(done) == len(replies) == self.client.world_size:
            self.memory = AdapterMemory.of(done)
            kept = all(r.host_kept for r in done)
            self._on_unloaded(slot, kept, sorted({n for r in done for n in r.host_dropped}))
        return failed

    async def _retry(self, slot: int, generation: int, ranks: list[int], rollback: bool) -> None:
        for delay in UNLOAD_RETRY_S:
            await asyncio.sleep(delay)
            ranks = await self._unload(slot, generation, ranks, rollback)
            if not ranks:
                self._on_empty(slot)
                return
        log.error("slot %d stays out of use: ranks %s did not unload generation %d", slot, ranks, generation)

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)


def _refused(reply: object) -> bool:
    return isinstance(reply, WorkerError) and reply.code in _REFUSED
