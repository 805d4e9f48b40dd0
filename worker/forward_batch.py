"""Per-step metadata passed explicitly to every layer (one argument instead of ten loose ones).

The runner plans it whole before the forward (`worker/step_plan.py`), so the forward itself is tensor
ops and kernel calls only: no host decisions, no device-to-host reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from worker.lora.batch import LoraBatch, SplitLoraBatch


@dataclass
class ForwardBatch:
    """Rows [0, num_prefill_tokens) are prompts of new sequences (`query_lens` tokens each, in row
    order), whole or one chunk of a chunked prefill; the rows after them are running sequences, one new
    token each (decode). A step may hold either kind or both (a join step).

    The attention tables cover the step's S sequences in row order, the new ones first: the native
    kernel reads them as they are; the torch path slices them (`worker/layers/attention.py`)."""

    num_prefill_tokens: int
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot (block * block_size + offset) of each token
    query_lens: list[int]  # prefill rows: tokens of each new sequence in row order (host side)
    # Per new sequence, the tokens cached before this step (0: a whole prompt or a first chunk; > 0: a
    # continuing chunk, which attends to its earlier chunks' K/V too); host side.
    prefix_lens: list[int]
    block_tables: torch.Tensor  # [S, max_blocks] int32, each sequence's blocks, padded with block 0
    context_lens: torch.Tensor  # [S] int32, cached tokens of each sequence including this step's rows
    query_starts: torch.Tensor  # [S + 1] int32, first row of each sequence (query_starts[S] = num_tokens)
    max_decode_blocks: int  # host side: block_tables columns the decode rows use (0 without decode rows)
    logits_indices: torch.Tensor  # [num_rows_out] int64, rows whose logits are computed
    lora: LoraBatch | SplitLoraBatch | None
    # Attention masks of the torch path, shared by the layers of one step (made by the first that needs one).
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    @property
    def num_prefill_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def attention_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_tables, query_starts, context_lens) of every sequence, as the native kernel reads them."""
        return self.block_tables, self.query_starts, self.context_lens

    @functools.cached_property
    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same for the decode sequences alone, their rows counted from 0 (made once per step)."""
        first = self.num_prefill_seqs
        num_decode = self.block_tables.shape[0] - first
        starts = torch.arange(num_decode + 1, dtype=torch.int32, device=self.block_tables.device)
        return self.block_tables[first:], starts, self.context_lens[first:]
