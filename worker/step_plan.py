"""A step's inputs, planned on the host before the forward: token ids, attention tables, LoRA tables.

Everything the forward would otherwise decide on the host (row layouts, block tables, each LoRA site's
parts) is made here, in a handful of host-to-device copies, so the forward is tensor ops and kernel
calls only: what CUDA graphs need, and what keeps Python out of the CPU step's hot loop.
"""

from __future__ import annotations

import torch

from worker.forward_batch import ForwardBatch
from worker.kernels import LoraOps
from worker.kernels.pool_args import StepRows
from worker.kv_cache import blocks_for
from worker.lora.batch import LoraBatch, SplitLoraBatch, StepLora
from worker.lora.pool import AdapterRows
from worker.lora.sites import LoraSite
from worker.lora.slots import AdapterSlots
from worker.sequence import StepSequences


class StepPlanner:
    def __init__(
        self,
        block_size: int,
        device: torch.device,
        lora_ops: LoraOps,
        slots: AdapterSlots,
        lora_sites: list[LoraSite],
    ):
        self.block_size = block_size
        self.device = device
        self.lora_ops = lora_ops
        self.slots = slots
        self.lora_sites = lora_sites
        self.lora_keys = [key for site in lora_sites for key in site.keys]  # the StepTables' K order
        self._last_lora: StepLora | None = None

    def plan(self, seqs: StepSequences) -> tuple[torch.Tensor, ForwardBatch]:
        """The forward's token ids [num_tokens] and metadata: each new sequence's prompt rows, then the
        last sampled token of each running sequence."""
        bs = self.block_size
        token_ids, positions, slots, row_slots, logits_rows = [], [], [], [], []
        tables, context_lens, query_starts = [], [], [0]
        for r in seqs.new:
            n, start, cached = len(r.token_ids), len(token_ids), r.num_cached
            token_ids += r.token_ids
            positions += range(cached, cached + n)
            slots += [r.block_table[p // bs] * bs + p % bs for p in range(cached, cached + n)]
            row_slots += [r.lora_slot] * n
            if r.prompt_logprobs:
                logits_rows += range(start, start + n)
            elif not r.more_chunks:  # a chunk that does not end its prompt samples nothing
                logits_rows.append(start + n - 1)
            tables.append(r.block_table[: blocks_for(cached + n, bs)])
            context_lens.append(cached + n)
            query_starts.append(len(token_ids))
        num_prefill = len(token_ids)
        for s in seqs.running:
            p = s.num_cached
            token_ids.append(s.last_token)
            positions.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
            row_slots.append(s.lora_slot)
            logits_rows.append(len(token_ids) - 1)
            tables.append(s.block_table[: blocks_for(p + 1, bs)])
            context_lens.append(p + 1)
            query_starts.append(len(token_ids))
        max_blocks = max(map(len, tables))
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        return self._long(token_ids), ForwardBatch(
            num_prefill_tokens=num_prefill,
            positions=self._long(positions),
            slot_mapping=self._long(slots),
            query_lens=[len(r.token_ids) for r in seqs.new],
            prefix_lens=[r.num_cached for r in seqs.new],
            block_tables=self._int(padded),
            context_lens=self._int(context_lens),
            query_starts=self._int(query_starts),
            max_decode_blocks=max((len(t) for t in tables[len(seqs.new) :]), default=0),
            logits_indices=self._long(logits_rows),
            lora=self._lora_batch(row_slots, num_prefill),
        )

    def _lora_batch(self, row_slots: list[int], num_prefill: int) -> LoraBatch | SplitLoraBatch | None:
        """The step's adapters' tables, built once with every site's parts, and its rows' view of them.
        Prompt rows take segments (sgmv) unless the ops take every kind of row in one call; decode rows
        the ops' choice. A join step's two kinds of rows are then applied as two batches, so each keeps
        the path that suits it."""
        if self.slots.pool is None or not any(row_slots):
            return None
        active = sorted({s for s in row_slots if s != 0})
        g_of = {slot: g for g, slot in enumerate(active)}
        g_of[0] = -1
        step = self._step_lora([self.slots.rows[s] for s in active])

        def build(slots: list[int], use_segments: bool) -> LoraBatch:
            rows = StepRows.build([g_of[s] for s in slots], step.adapters, use_segments, self.device)
            return LoraBatch(step, rows)

        decode_segments = self.lora_ops.decode_uses_segments
        if self.lora_ops.mixes_prompt_and_decode or num_prefill == 0:
            return build(row_slots, decode_segments)
        if num_prefill == len(row_slots):
            return build(row_slots, True)
        prompt, decode = row_slots[:num_prefill], row_slots[num_prefill:]
        return SplitLoraBatch(
            [
                (0, num_prefill, build(prompt, True)),
                (num_prefill, len(row_slots), build(decode, decode_segments)),
            ]
        )

    def _step_lora(self, adapters: list[AdapterRows]) -> StepLora:
        """The tables and site parts of `adapters`, made once and reused while the same ones run: the
        steps of a decode batch mostly repeat their predecessor's. Handles are never reused, so a
        placement or an eviction in between always makes new ones."""
        handles = tuple(a.handle for a in adapters)
        if self._last_lora is None or self._last_lora.adapters != handles:
            step = StepLora.build(self.lora_ops, self.slots.pool, adapters, self.lora_keys, self.device)
            step.plan_sites(self.lora_sites)
            self._last_lora = step
        return self._last_lora

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _int(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)
