"""LoRA gather-matmul ops: one implementation chosen per device, once, at construction.

Every implementation has the signatures and semantics of `reference.py` (the spec). The model never
branches on the device: it holds the `LoraOps` object returned by `select_lora_ops`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LoraOps(Protocol):
    """The four punica ops plus what the model needs to lay out its buffers and batches."""

    # True when decode batches should be passed as contiguous segments (sgmv) instead of per-row slots.
    decode_uses_segments: bool
    # True when the sub-modules of a fused layer (q/k/v, gate/up) should share one stack (fewer calls).
    fuse_sub_modules: bool

    def stack_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype of lora_a_stack / lora_b_stack for a model running in `model_dtype`."""
        ...

    def row_order(self, slots: list[int], slot_lora_ranks: dict[int, int]) -> list[int]:
        """The order to lay out a step's sequences in, whose adapter slots are `slots` (one or more rows
        each): a permutation of their indices. slot_lora_ranks: slot -> LoRA rank of its adapter."""
        ...

    def bgmv_shrink(self, x, lora_a_stack, slot_ids, lora_ranks, y) -> None: ...

    def bgmv_expand(self, y, lora_b_stack, slot_ids, lora_ranks, out, out_offset: int = 0) -> None: ...

    def sgmv_shrink(self, x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y) -> None: ...

    def sgmv_expand(
        self, y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset: int = 0
    ) -> None: ...

    # sgmv_shrink into the scratch y, then sgmv_expand from it (one call lets an implementation fuse).
    def sgmv_lora(
        self,
        x,
        lora_a_stack,
        lora_b_stack,
        segment_indptr,
        segment_slot_ids,
        lora_ranks,
        y,
        out,
        out_offset=0,
    ) -> None: ...


def select_lora_ops(device: torch.device) -> LoraOps:
    """The fast implementation for `device`: CUDA kernels on a GPU, grouped torch matmuls on the CPU."""
    if device.type == "cuda":
        from worker.kernels.cuda import CudaLoraOps

        return CudaLoraOps(device)
    from worker.kernels.torch_ops import TorchLoraOps

    return TorchLoraOps()
