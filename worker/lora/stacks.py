"""Stacked LoRA buffers of one base linear sub-module (q, k, v, o, gate, up or down) on one rank.

Slot 0 is the "no adapter" slot (rank 0); slot s > 0 holds the adapter loaded there. A and B are
stored padded to `max_rank` rows, but ops read only each slot's true rank, so small adapters do not pay
for the largest one's compute.

Tensor parallel: the stacks are sharded the way the base weight is. A column-parallel base (q/k/v/
gate/up, output sharded) keeps A whole and B's output rows for this rank; a row-parallel base (o/down,
input sharded) keeps A's input columns for this rank and B whole. Then x@A@B on each rank is exactly
that rank's share of the base layer's output, so LoRA adds no collective of its own: the column case
needs none, and the row case rides on the base layer's all-reduce (the sum of the partial deltas is
the full delta, by linearity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraLayout:
    """How big the stacks are: slot 0 (no adapter) plus one slot per resident adapter."""

    num_slots: int
    max_rank: int
    dtype: torch.dtype  # the stack dtype the LoRA ops want (LoraOps.stack_dtype)
    device: torch.device


@dataclass
class LoraStack:
    module: str  # q_proj, k_proj, ...
    out_offset: int  # first column of this sub-module in the layer's (local) output
    in_shard: tuple[int, int] | None  # (start, length) of A's columns kept on this rank, None = all
    out_shard: tuple[int, int] | None  # (start, length) of B's rows kept on this rank, None = all
    lora_a_stack: torch.Tensor  # [num_slots, max_rank, h_in_local]
    lora_b_stack: torch.Tensor  # [num_slots, max_rank, h_out_local]
    lora_ranks: torch.Tensor  # [num_slots] int32, on the model's device
    ranks: list[int]  # host copy of lora_ranks, to skip work without a device sync

    @classmethod
    def empty(cls, module, out_offset, in_shard, out_shard, h_in_local, h_out_local, layout: LoraLayout):
        num_slots, max_rank = layout.num_slots, layout.max_rank
        kw = dict(dtype=layout.dtype, device=layout.device)
        return cls(
            module=module,
            out_offset=out_offset,
            in_shard=in_shard,
            out_shard=out_shard,
            lora_a_stack=torch.zeros(num_slots, max_rank, h_in_local, **kw),
            lora_b_stack=torch.zeros(num_slots, max_rank, h_out_local, **kw),
            lora_ranks=torch.zeros(num_slots, dtype=torch.int32, device=layout.device),
            ranks=[0] * num_slots,
        )

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write one adapter's weights, a: [r, h_in] and b: [h_out, r] (full, unsharded), into `slot`."""
        r = a.shape[0]
        if r > self.lora_a_stack.shape[1]:
            raise ValueError(f"rank {r} exceeds the maximum LoRA rank {self.lora_a_stack.shape[1]}")
        if self.in_shard is not None:
            a = a[:, self.in_shard[0] : self.in_shard[0] + self.in_shard[1]]
        if self.out_shard is not None:
            b = b[self.out_shard[0] : self.out_shard[0] + self.out_shard[1]]
        # The scale is folded into B in float32, before any cast to the stack dtype.
        b_t = (b.float() * scale).T  # [r, h_out_local]
        self.clear_slot(slot)
        self.lora_a_stack[slot, :r].copy_(a)
        self.lora_b_stack[slot, :r].copy_(b_t)
        self.lora_ranks[slot] = r
        self.ranks[slot] = r

    def clear_slot(self, slot: int) -> None:
        self.lora_a_stack[slot].zero_()
        self.lora_b_stack[slot].zero_()
        self.lora_ranks[slot] = 0
        self.ranks[slot] = 0
