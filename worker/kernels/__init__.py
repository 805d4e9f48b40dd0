"""The model's kernels, one implementation chosen per device, once: LoRA gather-matmul ops over the
adapter pool, and paged attention.

Every LoRA implementation has the semantics of `reference.lora_site_ref` (the spec; arguments in
`pool_args.py`); the attention kernel those of `reference.paged_attention_ref`. The model never branches
on the device: it holds the objects returned by `select_lora_ops` and `select_attention_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from worker.kernels.pool_args import PoolPart, StepRows


class LoraOps(Protocol):
    """The pool op of one LoRA site plus what the model needs to lay out its pool and batches."""

    # True when decode rows should be grouped by adapter into segments (StepRows.use_segments).
    decode_uses_segments: bool
    # True when one call takes a join step's prompt and decode rows together, in any order (else the
    # runner applies them as two batches, prompt rows in segments).
    mixes_prompt_and_decode: bool

    def pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype of the adapter pool for a model running in `model_dtype`."""
        ...

    def row_order(self, adapters: list[int], adapter_lora_ranks: dict[int, int]) -> list[int]:
        """The order to lay out a step's sequences in, whose adapters (slot numbers, 0 = none) are
        `adapters` (one or more rows each): a permutation of their indices. adapter_lora_ranks: slot ->
        the LoRA rank of its adapter."""
        ...

    def lora_site(
        self,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        rows: StepRows,
        out: torch.Tensor,
    ) -> None:
        """out += the LoRA delta of every part for the rows with an adapter (`reference.lora_site_ref`).
        x: [T, h_in] model dtype; a_view: [num_rows(h_in), h_in] pool dtype; out: [T, h_out_local]."""
        ...


def select_lora_ops(
    device: torch.device, native_cpu: bool = True, build_cache: Path | None = None
) -> LoraOps:
    """The fast implementation for `device`: CUDA kernels on a GPU; on the CPU the native kernel
    (`cpu_native.py`, built on first use into `build_cache`, default ~/.cache/multilora/cpu_kernels)
    unless `native_cpu` is False or it cannot be built here (logged once), else grouped torch matmuls."""
    if device.type == "cuda":
        from worker.kernels.cuda import CudaLoraOps

        return CudaLoraOps(device)
    if native_cpu:
        from worker.kernels.cpu_native import NativeCpuLoraOps, load_native

        module = load_native(cache_root=build_cache)
        if module is not None:
            return NativeCpuLoraOps(module)
    from worker.kernels.torch_ops import TorchLoraOps

    return TorchLoraOps()


def select_attention_kernel(device: torch.device, native_cpu: bool = True, build_cache: Path | None = None):
    """The native paged attention kernel (`cpu_attention.py`) on the CPU unless `native_cpu` is False or
    it cannot be built here (logged once); None where the torch path serves (`worker/layers/attention.py`:
    on a GPU too, until a CUDA kernel joins it)."""
    if device.type != "cpu" or not native_cpu:
        return None
    from worker.kernels.cpu_attention import load_native_attention

    return load_native_attention(cache_root=build_cache)


def select_fused_ops(device: torch.device, native_cpu: bool = True, build_cache: Path | None = None):
    """The native fused small ops of the decoder layer (`cpu_fused.py`: residual add + RMSNorm, SiLU and
    mul, rotary) on the CPU unless `native_cpu` is False or they cannot be built here (logged once); None
    where torch's ops serve (`worker/layers/norm.py`, `rotary.py`, `models/llama.py`)."""
    if device.type != "cpu" or not native_cpu:
        return None
    from worker.kernels.cpu_fused import load_native_fused

    return load_native_fused(cache_root=build_cache)
