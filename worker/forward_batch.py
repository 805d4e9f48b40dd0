"""Per-step metadata passed explicitly to every layer (one argument instead of ten loose ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.lora.batch import LoraBatch


@dataclass
class ForwardBatch:
    is_prefill: bool
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot (block * block_size + offset) of each token
    query_lens: list[int]  # prefill: tokens of each sequence in row order (host side)
    block_tables: torch.Tensor | None  # decode: [num_seqs, max_blocks] int64, padded with 0
    context_lens: torch.Tensor | None  # decode: [num_seqs] int64, tokens in the cache incl. the new one
    logits_indices: torch.Tensor  # [num_rows_out] int64, rows whose logits are computed
    lora: LoraBatch | None
    # Attention masks shared by the layers of one step (made by the first layer that needs one).
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
