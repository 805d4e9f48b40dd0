"""The checks a step passes before any state changes, so that a bad request fails the call and leaves
every sequence as it was."""

from __future__ import annotations

from worker.errors import RequestError
from worker.lora.slots import AdapterSlots
from worker.sequence import PrefillRequest, SequenceState


class StepChecks:
    def __init__(self, sequences: dict[int, SequenceState], slots: AdapterSlots, block_size: int, vocab: int):
        self.sequences = sequences  # the runner's, read only here
        self.slots = slots
        self.block_size = block_size
        self.vocab = vocab

    def step(
        self, new: list[PrefillRequest], request_ids: list[int], grown: dict[int, list[int]]
    ) -> list[SequenceState]:
        """The running sequences of `request_ids`, once every sequence of the step is known to run."""
        for r in new:
            self.new(r)
        running = [self.seq(rid) for rid in request_ids]
        for rid, table in grown.items():
            old = self.seq(rid).block_table
            # The cache already written stays where it is: a grown table may only add blocks.
            if table[: len(old)] != old:
                raise RequestError(f"request {rid}: its grown block table does not extend its table")
        bs = self.block_size
        for rid, s in zip(request_ids, running, strict=True):
            # The router unloads a slot only once no sequence uses it, and the worker refuses to
            # otherwise; should the slot still have changed, the step fails rather than read other weights.
            self.slots.check_row(rid, s.lora_slot, s.adapter_generation, running=True)
            if s.prefilling:
                raise RequestError(f"request {rid} cannot decode: its prefill has chunks still to come")
            if s.num_cached // bs >= len(grown.get(rid, s.block_table)):
                raise RequestError(f"request {rid}: its block table has no room for token {s.num_cached + 1}")
        return running

    def new(self, r: PrefillRequest) -> None:
        if r.num_cached:
            self.chunk(r)
        elif r.request_id in self.sequences:
            raise RequestError(f"request {r.request_id} is already running")
        if not r.token_ids:
            raise RequestError(f"request {r.request_id} has no input tokens")
        total = r.num_cached + len(r.token_ids)
        if not r.more_chunks and not 0 <= r.num_generated < total:
            raise RequestError(f"request {r.request_id}: {r.num_generated} generated tokens and no prompt")
        if len(r.block_table) * self.block_size < total:
            raise RequestError(
                f"request {r.request_id}: {len(r.block_table)} blocks of {self.block_size} cannot hold "
                f"{total} tokens"
            )
        self.slots.check_row(r.request_id, r.lora_slot, r.adapter_generation, running=bool(r.num_cached))
        if min(r.token_ids) < 0 or max(r.token_ids) >= self.vocab:
            raise RequestError(f"request {r.request_id}: token ids must lie in [0, {self.vocab})")

    def chunk(self, r: PrefillRequest) -> None:
        """A chunk after the first must continue, in order, a sequence still prefilling in chunks."""
        s = self.sequences.get(r.request_id)
        if s is None or not s.prefilling:
            raise RequestError(f"request {r.request_id}: a continuing chunk for no sequence prefilling")
        if r.num_cached != s.num_cached:
            raise RequestError(
                f"request {r.request_id}: the chunk starts at token {r.num_cached}, {s.num_cached} are cached"
            )
        if r.block_table[: len(s.block_table)] != s.block_table:
            raise RequestError(f"request {r.request_id}: the chunk's block table does not extend its table")
        if (r.lora_slot, r.adapter_generation) != (s.lora_slot, s.adapter_generation):
            raise RequestError(f"request {r.request_id}: the chunk's adapter is not its first chunk's")

    def seq(self, rid: int) -> SequenceState:
        try:
            return self.sequences[rid]
        except KeyError:
            raise RequestError(f"request {rid} is not running on this worker") from None
