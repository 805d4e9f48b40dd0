"""Native CPU fused small ops of the decoder layer: `csrc/fused_cpu.cpp`, built on use.

At batch 1 a decode step is ~1,400 eager torch ops, each several microseconds of dispatch; the small ops
between the linears cost as much as the weights' read. These replace them, one native call each:

- `add_rms_norm` (in place): the residual add and the next RMSNorm; `rms_norm` for the first layer.
- `silu_mul`: SiLU(gate) * up straight from the fused gate_up output.
- `rotary`: the rotate-half rotary embedding of q and k (neighbours in the qkv output: one view).
- `rotary_cos_sin`: a step's cos / sin tables from its positions.

Semantics are the `reference.py` functions of the same names (`<op>_ref`), which are HF's ops: every
rounding to the model dtype torch makes between its ops is made here too (float32, bfloat16, float16).
The `.cpp` header states the layouts and the design. The build is `cpu_native.build(source="fused_cpu")`:
`-O3 -march=native -fopenmp`, cached under its cache root by a key of the source, the flags, torch,
Python and this CPU; when it cannot build, `load_native_fused` returns None, logs why once, and the model
keeps torch's ops.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

from worker.kernels import cpu_native

log = logging.getLogger(__name__)

SOURCE = "fused_cpu"  # csrc/fused_cpu.cpp, built by `cpu_native.build(source=SOURCE)`


class NativeCpuFused:
    """The fused ops (see the module docstring). Inputs are on the CPU, in one model dtype; shapes and
    dtypes are checked in C++ (ValueError naming the argument)."""

    def __init__(self, module: ModuleType):
        self.module = module

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Semantics: `reference.rms_norm_ref`, weight * rms_norm(x) with HF's rounding.

        x: [T, h]; weight: [h], x's dtype. Returns a new [T, h] tensor."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self.module.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: `reference.add_rms_norm_ref`: residual + x, and its rms_norm.

        x, residual: [T, h] (distinct tensors); weight: [h], x's dtype. In place: residual becomes
        x + residual (the stream), x its norm; returns (x, residual)."""
        if x.stride(-1) != 1 or residual.stride(-1) != 1:  # computed on copies, then written back
            xc, rc = x.contiguous(), residual.contiguous()
            self.module.add_rms_norm_(xc, rc, weight, eps)
            x.copy_(xc)
            residual.copy_(rc)
            return x, residual
        self.module.add_rms_norm_(x, residual, weight, eps)
        return x, residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Semantics: `reference.silu_mul_ref`, silu(gate) * up with torch's roundings.

        gate_up: [T, 2I] (gate columns first, as MergedColumnParallelLinear writes them). Returns [T, I]."""
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        return self.module.silu_mul(gate_up)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Semantics: `reference.rotary_ref`, x * cos + rotate_half(x) * sin with torch's roundings.

        x: [T, heads, D], any row and head strides (a view of the qkv output); cos, sin: [T, 1, D] (or
        [T, D]) in x's dtype. Returns a new contiguous [T, heads, D] tensor."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self.module.rotary(x, cos, sin)

    def rotary_cos_sin(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: `reference.rotary_cos_sin_ref`.

        positions: [T] int64; inv_freq: [D / 2] float32. Returns cos, sin: [T, 1, D] in `dtype`."""
        return self.module.rotary_cos_sin(positions.contiguous(), inv_freq, scaling, dtype)


@functools.cache
def load_native_fused(cache_root: Path | None = None) -> NativeCpuFused | None:
    """The fused ops built for this machine, or None (logged once) when they cannot be built here."""
    try:
        module = cpu_native.build(cache_root=cache_root, source=SOURCE)
    except Exception as e:  # no compiler, no ninja, a failed build: torch's ops serve instead
        log.warning("native CPU fused ops unavailable (%s: %s); using torch's ops", type(e).__name__, e)
        return None
    log.info("native CPU fused ops: %s", module.__file__)
    return NativeCpuFused(module)
