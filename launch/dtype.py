"""What DTYPE=auto resolves to: the dtype this machine computes natively.

On a GPU: bfloat16, or float16 where the GPU has no bf16. On the CPU: bfloat16 only where the CPU has
bf16 arithmetic (avx512_bf16 or AMX-BF16) and oneDNN, which runs torch's bf16 matmuls, may use it;
elsewhere torch emulates bf16 matmuls, several times slower than float32 ones, so float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) that leave out its bf16 kernels; the others, DEFAULT and ALL
# included, let it use them where the CPU has them.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@dataclass(frozen=True)
class CpuFacts:
    """What decides whether the CPU computes bfloat16 natively."""

    avx512_bf16: bool
    amx_bf16: bool
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA as the workers inherit it; None: not set


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


def cpu_facts() -> CpuFacts:
    """This machine's CpuFacts, from torch's cpuinfo probe and the environment the workers inherit.

    ATEN_CPU_CAPABILITY is deliberately not a fact: it caps torch's own vectorized kernels, not the oneDNN
    matmuls that dominate a step, which stay native bf16 under it.
    """
    import torch

    capabilities = torch.cpu.get_capabilities()
    # oneDNN reads this in each worker; the launcher reads it only to predict what they will compute.
    onednn_max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuFacts(
        avx512_bf16=bool(capabilities.get("avx512_bf16", False)),
        amx_bf16=bool(capabilities.get("amx_bf16", False)),
        onednn_max_isa=onednn_max_isa,
    )


def cpu_dtype(facts: CpuFacts) -> DtypeChoice:
    """bfloat16 where the CPU computes it natively, else float32; with the reason, for the log."""
    if not (facts.avx512_bf16 or facts.amx_bf16):
        return DtypeChoice("float32", "CPU has no avx512_bf16 or AMX: bf16 matmuls are emulated")
    unit = "avx512_bf16" if facts.avx512_bf16 else "AMX"
    isa = (facts.onednn_max_isa or "").strip().upper()
    if isa in ONEDNN_ISAS_WITHOUT_BF16:
        return DtypeChoice(
            "float32", f"ONEDNN_MAX_CPU_ISA={facts.onednn_max_isa} keeps oneDNN off the CPU's {unit}"
        )
    return DtypeChoice("bfloat16", f"CPU has {unit}")


def auto_dtype(device: str) -> DtypeChoice:
    """What DTYPE=auto means on `device` ("cpu" or "cuda") of this machine."""
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "the GPU has bf16")
        return DtypeChoice("float16", "the GPU has no bf16")
    return cpu_dtype(cpu_facts())
