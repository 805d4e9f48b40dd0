"""Per-step metadata passed explicitly to every layer (one argument instead of ten loose ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.lora.batch import LoraBatch, SplitLoraBatch


@dataclass
class ForwardBatch:
    """Rows [0, num_prefill_tokens) are prompts of new sequences (`query_lens` tokens each, in row
    order), whole or one chunk of a chunked prefill; the rows after them are running sequences, one new
    token each (decode). A step may hold either kind or both (a join step)."""

    num_prefill_tokens: int
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot (block * block_size + offset) of each token
    query_lens: list[int]  # prefill rows: tokens of each new sequence in row order (host side)
    block_tables: torch.Tensor | None  # decode rows: [num_decode, max_blocks] int64, padded with 0
    context_lens: torch.Tensor | None  # decode rows: [num_decode] int64, cached tokens incl. the new one
    logits_indices: torch.Tensor  # [num_rows_out] int64, rows whose logits are computed
    lora: LoraBatch | SplitLoraBatch | None
    # Prefill rows that continue a chunked prefill attend to the K/V their earlier chunks cached too:
    # per new sequence, the tokens already cached (0: a whole prompt or a first chunk; host side) and,
    # where > 0, its block table [blocks] int64 covering the cached tokens and this chunk.
    prefix_lens: list[int] = field(default_factory=list)
    prefix_tables: list[torch.Tensor | None] = field(default_factory=list)
    # Attention masks shared by the layers of one step (made by the first layer that needs one).
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
