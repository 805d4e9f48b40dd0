"""Stacked LoRA buffers of one base linear layer on one rank.

Slot 0 is the "no adapter" slot (rank 0); slot s > 0 holds the adapter loaded there. A and B are
stored padded to a maximum rank, but ops read only each slot's true rank, so small adapters do not pay
for the largest one's compute.

A stack serves one sub-module (q, k, v, o, gate, up or down) or, when the LoRA ops prefer fewer and
larger calls (the CPU path: per-call overhead dominates its small matmuls), all sub-modules of a fused
layer (qkv, gate_up) at once. A fused stack packs each slot's parts consecutively: A rows
[q rows; k rows; v rows] and a block-diagonal B whose q rows fill only the q output columns, and so on.
Then one shrink and one expand cover the whole fused layer, with slot rank r_q + r_k + r_v.

Tensor parallel: the stacks are sharded the way the base weight is. A column-parallel base (q/k/v/
gate/up, output sharded) keeps A whole and B's output columns for this rank; a row-parallel base (o/
down, input sharded) keeps A's input columns for this rank and B whole. Then x@A@B on each rank is
exactly that rank's share of the base layer's output, so LoRA adds no collective of its own: the column
case needs none, and the row case rides on the base layer's all-reduce (the sum of the partial deltas
is the full delta, by linearity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraLayout:
    """How big the stacks are: slot 0 (no adapter) plus one slot per resident adapter."""

    num_slots: int
    max_lora_rank: int  # per sub-module
    dtype: torch.dtype  # the stack dtype the LoRA ops want (LoraOps.stack_dtype)
    device: torch.device
    fuse_sub_modules: bool = False  # one stack per fused layer instead of one per sub-module


@dataclass(frozen=True)
class LoraPart:
    """One sub-module's place in a stack."""

    module: str  # q_proj, k_proj, ...
    in_shard: tuple[int, int] | None  # (start, length) of A's columns kept on this rank, None = all
    out_shard: tuple[int, int] | None  # (start, length) of B's rows kept on this rank, None = all
    column: int  # first column of this part in the stack's B
    width: int  # columns of this part (h_out on this rank)


@dataclass(frozen=True)
class SlotPart:
    """One sub-module's share of an adapter, in the stack dtype, ready to copy into a slot."""

    row: int  # first row of the slot it fills
    column: int  # first column of the stack's B it fills
    a: torch.Tensor  # [r, h_in_local]
    b_t: torch.Tensor  # [r, width]: B transposed, with the scale folded in


@dataclass(frozen=True)
class SlotWeights:
    """One adapter's share of one stack (`LoraStack.prepare`); the slot's rank is `lora_rank`."""

    parts: tuple[SlotPart, ...]
    lora_rank: int  # rows of the slot used: the sum of the parts' ranks

    @property
    def num_elements(self) -> int:
        """The adapter's A and B elements in this stack (on this rank)."""
        return sum(p.a.numel() + p.b_t.numel() for p in self.parts)


@dataclass
class LoraStack:
    parts: list[LoraPart]
    out_offset: int  # first column of the stack's B in the layer's (local) output
    lora_a_stack: torch.Tensor  # [num_slots, max_lora_rank * len(parts), h_in_local]
    lora_b_stack: torch.Tensor  # [num_slots, max_lora_rank * len(parts), sum of part widths]
    lora_ranks: torch.Tensor  # [num_slots] int32, on the model's device
    host_lora_ranks: list[int]  # host copy of lora_ranks, to skip work without a device sync

    @classmethod
    def empty(cls, parts: list[LoraPart], out_offset: int, h_in_local: int, layout: LoraLayout) -> LoraStack:
        num_slots, rows = layout.num_slots, layout.max_lora_rank * len(parts)
        width = sum(p.width for p in parts)
        kw = dict(dtype=layout.dtype, device=layout.device)
        return cls(
            parts=parts,
            out_offset=out_offset,
            lora_a_stack=torch.zeros(num_slots, rows, h_in_local, **kw),
            lora_b_stack=torch.zeros(num_slots, rows, width, **kw),
            lora_ranks=torch.zeros(num_slots, dtype=torch.int32, device=layout.device),
            host_lora_ranks=[0] * num_slots,
        )

    @property
    def modules(self) -> list[str]:
        return [p.module for p in self.parts]

    def prepare(self, weights: dict, pin: bool = False) -> SlotWeights:
        """One adapter's share of this stack, sharded, scaled and cast, ready for `place`. Changes
        nothing, so it can run off the step thread. weights: module -> object with `a` [r, h_in], `b`
        [h_out, r] (full, unsharded) and `scale`; modules the adapter does not touch are absent. `pin`:
        page-locked host tensors, so that `place` copies them to a GPU without waiting."""
        parts, row = [], 0
        max_lora_rank = self.lora_a_stack.shape[1] // len(self.parts)
        dtype = self.lora_a_stack.dtype
        for part in self.parts:
            w = weights.get(part.module)
            if w is None:
                continue
            a, b, r = w.a, w.b, w.a.shape[0]
            if r > max_lora_rank:
                raise ValueError(f"{part.module}: LoRA rank {r} exceeds the maximum {max_lora_rank}")
            if part.in_shard is not None:
                a = a[:, part.in_shard[0] : part.in_shard[0] + part.in_shard[1]]
            if part.out_shard is not None:
                b = b[part.out_shard[0] : part.out_shard[0] + part.out_shard[1]]
            # The scale is folded into B in float32, then both are cast once to the stack dtype (the
            # rounding a copy into the stack would do).
            a = a.to(dtype).contiguous()  # [r, h_in_local]
            b_t = (b.float() * w.scale).T.to(dtype).contiguous()  # [r, width]
            if pin:
                a, b_t = a.pin_memory(), b_t.pin_memory()
            parts.append(SlotPart(row=row, column=part.column, a=a, b_t=b_t))
            row += r
        return SlotWeights(tuple(parts), row)

    def place(self, slot: int, weights: SlotWeights) -> None:
        """Write prepared weights into `slot`, over everything the slot held: the whole slot is zeroed
        first, so no row or column an op can read (rows below the slot's rank, every column of B)
        keeps a previous adapter's values."""
        self.clear_slot(slot)
        for p in weights.parts:
            r = p.a.shape[0]
            self.lora_a_stack[slot, p.row : p.row + r].copy_(p.a, non_blocking=True)
            self.lora_b_stack[slot, p.row : p.row + r, p.column : p.column + p.b_t.shape[1]].copy_(
                p.b_t, non_blocking=True
            )
        self.lora_ranks[slot] = weights.lora_rank
        self.host_lora_ranks[slot] = weights.lora_rank

    def set_slot(self, slot: int, weights: dict) -> None:
        """`prepare` then `place`: write one adapter into `slot`."""
        self.place(slot, self.prepare(weights))

    def clear_slot(self, slot: int) -> None:
        """Empty `slot`: zeros and rank 0, so nothing can read the weights it held."""
        self.lora_a_stack[slot].zero_()
        self.lora_b_stack[slot].zero_()
        self.lora_ranks[slot] = 0
        self.host_lora_ranks[slot] = 0


def build_stacks(parts: list[LoraPart], h_in_local: int, layout: LoraLayout | None) -> list[LoraStack]:
    """The stacks of one layer: one for all parts when the layout fuses, else one per part."""
    if layout is None or not parts:
        return []
    if layout.fuse_sub_modules:
        start = parts[0].column
        rebased = [LoraPart(p.module, p.in_shard, p.out_shard, p.column - start, p.width) for p in parts]
        return [LoraStack.empty(rebased, start, h_in_local, layout)]
    return [
        LoraStack.empty(
            [LoraPart(p.module, p.in_shard, p.out_shard, 0, p.width)], p.column, h_in_local, layout
        )
        for p in parts
    ]
