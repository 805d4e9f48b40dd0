"""Native CPU paged attention: `csrc/attention_cpu.cpp`, built on use by `cpu_native.build`.

Semantics are `reference.paged_attention_ref` (the spec); the `.cpp` header states the layouts and the
kernel design. One call per layer covers every row of a step (decode rows, whole prompts, continuing
prefill chunks) and reads the KV blocks in place through the block table: no gather, no mask tensor.
The build is cached like the LoRA kernel's (`cpu_native.py`: its own key and directory under the cache
root); when it cannot be built, `load_native_attention` returns None, logs why once, and the torch
path (`worker/layers/attention.py`) serves.

Every argument is checked in C++ before anything is read (ValueError naming it), so the wrapper adds
nothing per call: the layer calls it 30 times a step.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

from worker.kernels import cpu_native

log = logging.getLogger(__name__)


class NativeCpuAttention:
    """Paged attention over the KV cache as one native call per layer (see the module docstring)."""

    def __init__(self, module: ModuleType):
        self.module = module
        self._call = module.paged_attention

    @staticmethod
    def takes_prompts(dtype: torch.dtype) -> bool:
        """Whether prompt and chunk rows in `dtype` should come here. Not bfloat16: there torch's SDPA
        (whose bf16 GEMMs oneDNN runs on AMX or avx512_bf16 dot products) took 0.33-0.66x the time of
        this kernel on a 2-core Xeon with AMX (bench_attention_cpu, prompts 1x512, 4x128, 1x2048, chunks
        of 64 and 512 after 8000 tokens), while in float32 this kernel took 0.55-0.9x SDPA's. Decode rows
        always come here: 1.6-20x faster in every dtype, reading the blocks in place."""
        return dtype != torch.bfloat16

    def paged_attention(
        self,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        query_starts: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        sliding_window: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`reference.paged_attention_ref` (the spec: semantics and shapes), with what the kernel adds:
        q's heads contiguous (any row and head stride) and D a multiple of 8; the caches contiguous;
        block_tables' rows contiguous; `out`, optional, a preallocated [T, H, D] of q's dtype (heads
        contiguous) written in place and returned. Raises ValueError naming a bad argument; no block is
        read before every block id that will be read is checked.
        """
        return self._call(
            q, key_cache, value_cache, block_tables, query_starts, context_lens, scale, sliding_window, out
        )


@functools.cache
def load_native_attention(cache_root: Path | None = None) -> NativeCpuAttention | None:
    """The kernel built for this machine, or None (logged once) when it cannot be built here."""
    try:
        module = cpu_native.build(cache_root=cache_root, source="attention_cpu")
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves instead
        log.warning(
            "native CPU attention kernel unavailable (%s: %s); using the torch path", type(e).__name__, e
        )
        return None
    log.info("native CPU attention kernel: %s", module.__file__)
    return NativeCpuAttention(module)
