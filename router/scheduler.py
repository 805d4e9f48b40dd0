"""The continuous-batching loop: the one task that talks to the workers about sequences.

Policy (TGI v3's loop with prefill chunking; vLLM's blocks on demand with preemption by recompute):

- Requests wait in a queue that is fair across tenants and adapters (virtual token counters,
  router/fairness.py and router/queue.py): admission takes, one at a time, the head of the client that
  has been served least, among those whose head fits: `max_batch_size` running sequences,
  `max_batch_prefill_tokens` tokens in this prefill, free KV blocks, and `max_batch_total_tokens`: the
  KV cache (in whole blocks) the running batch may hold, which is what it bounds now; nothing is
  reserved for max_new_tokens, so a request without one reserves no whole context. Prompts are charged
  at admission, generated tokens as `_step` hands them out.
- KV blocks on demand (router/block_manager.py): a sequence holds blocks for the tokens its next step
  leaves in the cache. Before each decode, `_make_room` gives the running sequences, oldest first, the
  block their next token needs (sent to the workers in the Decode's `grown`). When the pool (or
  max_batch_total_tokens) runs out, the newest-admitted running sequence is preempted: the workers
  Release it, its blocks return, and it is re-queued at the front (`queue.push_front`). Re-admitted, it
  is recomputed: its prefill is the prompt plus the tokens it already produced, with `num_generated`
  telling the workers' sampler to resume its seeded generator after that many draws, and the token that
  prefill samples is its next one. Its client sees a pause; its output is that of an uninterrupted run.
  Blocks return when it finishes, fails or is cancelled.
- Chunked prefill: a prefill (prompt or recompute) longer than `max_batch_prefill_tokens` is admitted
  with a first chunk of what the step's prefill budget has left (router/queue.py, `chunk_over`), and is
  "prefilling" until its last chunk: each step, `_make_room` gives the prefilling sequences, oldest
  first, their next chunk (at most what the budget has left; its blocks, or a smaller chunk while any
  block is left, else the newest is preempted), newcomers take what remains of the budget, and the
  chunks go in the step's join (`Sequence.to_pb`: `num_cached`, `more_chunks`) while the running
  sequences decode. Only the last chunk samples a token; a prefilling sequence does not decode. Cancelled
  mid-prefill it is released at the next step boundary; preempted, its chunks are recomputed.
- With nothing decoding, whatever fits is prefilled at once. While a batch is decoding, newcomers join
  in a join step: one Decode call whose forward runs their prompts (or chunks) and everybody else's next token
  together (the running batch does not pause for a separate prefill forward). If that call fails, it is
  redone as a Prefill and a Decode, so that a bad newcomer fails alone. To avoid slowing a large batch
  for a trickle of arrivals, joining waits until at least `floor(running * waiting_served_ratio)`
  sequences can be admitted together, unless `max_waiting_tokens` decode steps have passed since the
  last prefill (TGI's policy; our default ratio is 0, not TGI's 0.3: a join step is cheap, see config).
- Requests for different adapters share prefills and decode steps; each carries its adapter slot.
- After every step, finished sequences (eos, stop sequence, length) leave at once: one Release call, then
  their blocks are freed and their adapter leases released (`_free`: the workers no longer run them, so
  the registry may now evict or unload their adapter). Sequences whose client went away are released at
  the next step boundary (or simply dropped from the queue if they had not started).
- A worker error fails exactly the sequences of that step with a 424 generation error; the loop goes on.

Each sequence reports its tokens as events on its own queue (see `router.sequence`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence as Seq

from proto import generate_pb2 as pb
from router.adapters import AdapterLease
from router.block_manager import BlockManager
from router.client import ShardedClient, WorkerError
from router.errors import GenerationError
from router.fairness import OUTPUT_TOKEN_COST, FairnessLedger
from router.limits import Limits
from router.metrics import Load, Metrics
from router.queue import RequestQueue
from router.sequence import Sequence, SequenceParams, Status
from router.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)

# Release of finished sequences must not hold the loop for long if a worker hangs.
_RELEASE_TIMEOUT_S = 30.0


class Scheduler:
    def __init__(
        self,
        client: ShardedClient,
        limits: Limits,
        blocks: BlockManager,
        tokenizer: ModelTokenizer,
        metrics: Metrics,
    ):
        self.client = client
        self.metrics = metrics
        self.limits = limits
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.fairness = FairnessLedger(limits.fairness)
        # A client whose next request does not fit yet may be overtaken by at most one largest request.
        self.queue = RequestQueue(
            blocks,
            self.fairness,
            max_queued_per_adapter=limits.max_queued_per_adapter,
            overtake_slack=OUTPUT_TOKEN_COST * limits.max_total_tokens,
        )
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._next_id = 1
        self._steps_since_prefill = 0

    # ---- called by request handlers -------------------------------------------------------------

    def check_room(self, lease: AdapterLease | None, count: int) -> None:
        """Raise AdapterQueueFullError (429) unless `count` more sequences for `lease`'s adapter may wait."""
        self.queue.check_room(self.limits.fairness.adapter(None if lease is None else lease.id), count)

    def submit(
        self, params: SequenceParams, lease: AdapterLease | None = None, tenant: str | None = None
    ) -> Sequence:
        """Queue a sequence of `tenant`; `lease` (its adapter's, matching params.lora_slot) is released
        when it is freed."""
        client = self.limits.fairness.client(tenant, None if lease is None else lease.id)
        seq = Sequence(self._next_id, params, self.tokenizer, lease=lease, fair_client=client)
        self._next_id += 1
        self.queue.append(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client went away: drop a waiting sequence now, a running one at the next step boundary."""
        if seq.status is Status.FINISHED:
            return
        seq.cancelled = True
        if seq.status is Status.WAITING and self.queue.remove(seq):
            self._free(seq)
        self._wake.set()

    def load(self) -> Load:
        """What is queued and running now, for the metrics' gauges."""
        slots = {s.params.lora_slot for s in (*self.queue, *self.running) if s.params.lora_slot}
        return Load(
            queued=len(self.queue),
            running=len(self.running),
            reserved_tokens=self._held_blocks() * self.blocks.block_size,
            blocks_used=self.blocks.num_blocks - self.blocks.num_free,
            active_slots=len(slots),
            queued_by_adapter=self.queue.queued_by_adapter(),
        )

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self._iteration()
            except Exception as e:  # a bug: fail what was running rather than hang it, and go on
                log.exception("scheduler iteration failed")
                for seq in self.running:
                    seq.fail(GenerationError(f"internal error: {e!r}"))
                await self._release(list(self.running))

    async def _iteration(self) -> None:
        """Release the cancelled, then one prefill and/or decode step, or sleep until a request comes."""
        await self._release([s for s in self.running if s.cancelled])
        chunk_tokens = 0
        if self.running:
            # Before admission, so newcomers cannot take what the batch needs (its next chunks included).
            chunk_tokens = await self._make_room()
        decoding = [s for s in self.running if not s.prefilling]
        chunks = [s for s in self.running if s.prefilling and s.chunk_end > s.prefilled]
        new = self._admit(
            joining=bool(self.running), prefill_budget=self.limits.max_batch_prefill_tokens - chunk_tokens
        )
        if decoding and (chunks or new):
            await self._join(decoding, chunks, new)
        elif decoding:
            await self._decode()
        elif chunks or new:
            await self._prefill(chunks, new)
        elif self.queue:
            self._fail_unschedulable()
        else:
            self._wake.clear()
            await self._wake.wait()

    async def close(self, reason: str = "the server is shutting down") -> None:
        """Fail everything still queued or running (after the loop task was cancelled)."""
        error = GenerationError(reason)
        for seq in list(self.queue):
            self.queue.remove(seq)
            seq.fail(error)
            self._free(seq)
        for seq in self.running:
            seq.fail(error)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races its result.
        try:
            async with asyncio.timeout(5.0):
                await self._release(list(self.running))
        except TimeoutError:
            log.warning("workers did not answer Release at shutdown")

    def _admit(self, joining: bool, prefill_budget: int) -> list[Sequence]:
        lim = self.limits
        min_size = 0
        if joining and self._steps_since_prefill < lim.max_waiting_tokens:
            min_size = int(len(self.running) * lim.waiting_served_ratio)
        max_size = None if lim.max_batch_size is None else lim.max_batch_size - len(self.running)
        if max_size is not None and max_size <= 0:
            return []
        return self.queue.next_batch(
            min_size=min_size,
            max_size=max_size,
            prefill_budget=prefill_budget,
            token_budget=(self._block_limit() - self._held_blocks()) * self.blocks.block_size,
            chunk_over=lim.max_batch_prefill_tokens,
        )

    def _block_limit(self) -> int:
        """The blocks the running batch may hold: max_batch_total_tokens in whole blocks (rounded up, so a
        request of max_total_tokens always fits an empty batch)."""
        return self.blocks.blocks_for(self.limits.max_batch_total_tokens)

    def _held_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.running)

    async def _make_room(self) -> int:
        """Give every running sequence, oldest first, the blocks its next token needs, or, if it is
        prefilling in chunks, its next chunk: as much of the rest of its prefill as the step's prefill
        budget has left and the blocks allow. While a sequence cannot get even one token's blocks,
        preempt the newest-admitted running sequence (possibly the one asking). Returns the prefill
        tokens the continuing chunks take this step."""
        victims: list[Sequence] = []
        budget = self.limits.max_batch_prefill_tokens
        for seq in sorted(self.running, key=lambda s: s.admission):
            if seq in victims:
                break  # the rest are newer, so preempted too
            if seq.prefilling:
                seq.chunk_end = seq.prefilled + min(seq.num_tokens - seq.prefilled, budget)
            while seq not in victims:
                if seq.prefilling:  # a smaller chunk rather than a preemption, while one token fits
                    fit = (len(seq.blocks) + self._room()) * self.blocks.block_size
                    if fit > seq.prefilled:
                        seq.chunk_end = min(seq.chunk_end, fit)
                target = seq.chunk_end if seq.prefilling else seq.num_tokens
                if self.blocks.missing(seq.blocks, target) <= self._room():
                    self.blocks.grow(seq.blocks, target)
                    budget -= target - seq.prefilled if seq.prefilling else 0
                    break
                victim = max(self.running, key=lambda s: s.admission)
                self._take_back(victim)
                victims.append(victim)
        if victims:
            await self._preempt(victims)
        return sum(s.chunk_end - s.prefilled for s in self.running if s.prefilling)

    def _room(self) -> int:
        """Blocks the running batch may still take."""
        return min(self.blocks.num_free, self._block_limit() - self._held_blocks())

    def _take_back(self, seq: Sequence) -> None:
        """Preempt `seq` here: its blocks return and it waits at the front of the queue (newest pushed
        first, so the oldest preempted goes first). The workers are told in `_preempt`."""
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks = []
        seq.blocks_sent = 0
        seq.prefilling, seq.prefilled = False, 0  # a chunked prefill is recomputed from its start
        seq.preemptions += 1
        self.queue.push_front(seq)
        self.metrics.preempted(seq.fair_client[1])

    async def _preempt(self, seqs: list[Sequence]) -> None:
        """The workers forget the preempted `seqs`, whose blocks were already taken back; if they cannot
        say they did, a recompute would collide with what they still hold, so those requests fail."""
        log.info("KV cache full: preempted %s (running %d)", [s.id for s in seqs], len(self.running))
        try:
            await self.client.release(sorted(s.id for s in seqs), timeout=_RELEASE_TIMEOUT_S)
        except WorkerError as e:
            log.warning("Release of preempted %s failed: %s", [s.id for s in seqs], e)
            for seq in seqs:
                if self.queue.remove(seq):
                    seq.fail(GenerationError(f"preemption failed: {e}"))
                    self._free(seq)

    def _fail_unschedulable(self) -> None:
        # Validation bounds every request by limits an empty batch satisfies, so this means a bug; failing
        # the head beats spinning on it forever.
        seq = next(iter(self.queue))
        self.queue.remove(seq)
        log.error("request %d (%d tokens) does not fit an empty batch; failing it", seq.id, seq.num_tokens)
        seq.fail(GenerationError(f"the request needs {seq.num_tokens} tokens of KV cache, which cannot fit"))
        self._free(seq)

    async def _prefill(self, chunks: list[Sequence], new: list[Sequence]) -> None:
        self._start(new)
        await self._prefill_step(chunks + new)

    async def _join(self, old: list[Sequence], chunks: list[Sequence], new: list[Sequence]) -> None:
        """The newcomers' prefill (or first chunks), the next chunks of those prefilling in chunks, and
        the decoding batch `old`'s next token, in one Decode call (one forward), so the batch does not
        pause for a prefill step of their own."""
        self._start(new)
        prefills = chunks + new
        joining = [s.to_pb() for s in prefills]
        call = self.client.decode([s.id for s in old], joining=joining, grown=_grown(old))
        if await self._step("Decode", prefills + old, call, fail=False):
            return
        # Redo the step as a prefill and a decode, so that an error fails only the sequences of the call
        # that raised it: one bad newcomer must not fail the running batch. (A worker that is broken
        # fails both calls, and so everybody.)
        log.warning("join step failed; retrying its prefill and decode apart")
        await self._prefill_step(prefills)
        if any(not s.prefilling for s in self.running):
            await self._decode()

    async def _prefill_step(self, prefills: list[Sequence]) -> None:
        """The Prefill call of sequences already started (see _start): each one's next (or only) chunk."""
        await self._step("Prefill", prefills, self.client.prefill([s.to_pb() for s in prefills]))

    def _start(self, new: list[Sequence]) -> None:
        if not new:
            return
        log.debug("prefill %s (running %d)", [s.id for s in new], len(self.running))
        waited = self._steps_since_prefill >= self.limits.max_waiting_tokens
        self.metrics.new_batch(len(new), joining=bool(self.running), waited=waited)
        self.running.extend(new)
        self._steps_since_prefill = 0

    async def _decode(self) -> None:
        seqs = [s for s in self.running if not s.prefilling]
        self._steps_since_prefill += 1
        await self._step("Decode", seqs, self.client.decode([s.id for s in seqs], grown=_grown(seqs)))

    async def _step(self, method: str, seqs: list[Sequence], call, fail: bool = True) -> bool:
        """Run one step RPC and hand each sequence its token; False if it failed. A failure fails exactly
        these sequences, or, with `fail=False`, none: the caller retries them."""
        start = time.monotonic()
        try:
            reply: pb.StepResponse = await call
        except Exception as e:  # a worker error, or a bug: either way nobody may hang
            self.metrics.step(method, time.monotonic() - start, forward_ns=None)
            if not isinstance(e, WorkerError):
                log.exception("%s step failed", method)
            if fail:
                for seq in seqs:
                    seq.fail(GenerationError(str(e)))
                await self._release(seqs)
            return False
        self.metrics.step(method, time.monotonic() - start, forward_ns=reply.forward_ns)
        for seq in seqs:
            seq.blocks_sent = len(seq.blocks)  # the workers now hold these tables whole
            if seq.prefilling:  # its chunk is in the workers' cache; only the last one samples
                seq.prefilled = seq.chunk_end
                seq.prefilling = seq.chunk_end < seq.num_tokens
        by_id = {g.request_id: g for g in reply.generations}
        done = []
        for seq in seqs:
            gen = by_id.get(seq.id)
            if seq.cancelled:
                done.append(seq)
            elif seq.prefilling:
                continue
            elif gen is None:
                seq.fail(GenerationError(f"{method} returned no token for request {seq.id}"))
                done.append(seq)
            else:
                self.fairness.charge(seq.fair_client, output=1)
                if seq.on_generation(gen):
                    done.append(seq)
        await self._release(done)
        return True

    async def _release(self, seqs: Seq[Sequence]) -> None:
        """Tell the workers to forget `seqs`, then free their blocks (even if the workers fail)."""
        if not seqs:
            return
        ids = {s.id for s in seqs}
        self.running = [s for s in self.running if s.id not in ids]
        try:
            await self.client.release(sorted(ids), timeout=_RELEASE_TIMEOUT_S)
        except WorkerError as e:
            log.warning("Release of %s failed: %s", sorted(ids), e)
        for seq in seqs:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        """`seq` is done and no worker holds it: its blocks and its adapter lease go back."""
        self.blocks.free(seq.blocks)
        seq.blocks = []
        seq.status = Status.FINISHED
        if seq.lease is not None:
            seq.lease.release()


def _grown(seqs: list[Sequence]) -> list[pb.BlockTable]:
    """The whole tables of the running `seqs` that grew since the workers last saw them."""
    grown = [s for s in seqs if len(s.blocks) > s.blocks_sent]
    return [pb.BlockTable(request_id=s.id, block_table=s.blocks) for s in grown]
