"""Per-step LoRA metadata: which slot each row uses, and how to apply the stacks of one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels import LoraOps
from worker.lora.stacks import LoraStack


@dataclass
class LoraBatch:
    """Built once per forward by the runner and read by every LoRA-capable layer."""

    ops: LoraOps
    use_segments: bool  # sgmv (contiguous rows per slot) instead of bgmv (a slot per row)
    slot_ids: torch.Tensor  # [num_tokens] int32
    segment_indptr: torch.Tensor  # [num_segments + 1] int32
    segment_slot_ids: torch.Tensor  # [num_segments] int32
    active_slots: tuple[int, ...]  # distinct slots with an adapter in this batch (host side)
    scratch: dict[int, torch.Tensor]  # stack rows -> [num_tokens, rows] float32 for the x@A intermediate

    @classmethod
    def build(cls, ops: LoraOps, row_slots: list[int], use_segments: bool, device: torch.device) -> LoraBatch:
        """`row_slots`: the slot of each token row, in row order."""
        indptr, seg_slots = [0], []
        for i, s in enumerate(row_slots):
            if seg_slots and seg_slots[-1] == s:
                indptr[-1] = i + 1
            else:
                seg_slots.append(s)
                indptr.append(i + 1)

        def as_tensor(v):
            return torch.tensor(v, dtype=torch.int32, device=device)

        return cls(
            ops=ops,
            use_segments=use_segments,
            slot_ids=as_tensor(row_slots),
            segment_indptr=as_tensor(indptr),
            segment_slot_ids=as_tensor(seg_slots),
            active_slots=tuple(sorted({s for s in row_slots if s != 0})),
            scratch={},
        )

    def apply(self, stacks: list[LoraStack], x: torch.Tensor, out: torch.Tensor) -> None:
        """out[:, stack slice] += x @ A[slot] @ B[slot] for every stack some row's adapter uses.

        x: [num_tokens, h_in_local]; out: [num_tokens, h_out_local_total], updated in place.
        """
        for st in stacks:
            if not any(st.host_lora_ranks[s] for s in self.active_slots):
                continue
            rows = st.lora_a_stack.shape[1]
            if rows not in self.scratch:  # one per stack height, reused by every layer of the step
                self.scratch[rows] = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
            y = self.scratch[rows]
            if self.use_segments:
                self.ops.sgmv_lora(
                    x,
                    st.lora_a_stack,
                    st.lora_b_stack,
                    self.segment_indptr,
                    self.segment_slot_ids,
                    st.lora_ranks,
                    y,
                    out,
                    st.out_offset,
                )
            else:
                self.ops.bgmv_shrink(x, st.lora_a_stack, self.slot_ids, st.lora_ranks, y)
                self.ops.bgmv_expand(y, st.lora_b_stack, self.slot_ids, st.lora_ranks, out, st.out_offset)


@dataclass
class SplitLoraBatch:
    """Row ranges applied as separate LoraBatches: a join step's prompt rows, then its decode rows."""

    parts: list[tuple[int, int, LoraBatch]]  # (first row, end row, the batch of those rows)

    def apply(self, stacks: list[LoraStack], x: torch.Tensor, out: torch.Tensor) -> None:
        """As LoraBatch.apply, each part on its rows (views: out is updated in place)."""
        for start, end, part in self.parts:
            part.apply(stacks, x[start:end], out[start:end])
