"""DTYPE=auto: the dtype the device computes natively, decided from facts a test can set."""

from __future__ import annotations

import pytest
import torch

from launch.dtype import CpuFacts, auto_dtype, cpu_dtype, cpu_facts


@pytest.mark.parametrize(
    "facts, dtype, reason",
    [
        (CpuFacts(avx512_bf16=True, amx_bf16=False, onednn_max_isa=None), "bfloat16", "CPU has avx512_bf16"),
        (CpuFacts(avx512_bf16=True, amx_bf16=True, onednn_max_isa=None), "bfloat16", "CPU has avx512_bf16"),
        (CpuFacts(avx512_bf16=False, amx_bf16=True, onednn_max_isa=None), "bfloat16", "CPU has AMX"),
        (
            CpuFacts(avx512_bf16=False, amx_bf16=False, onednn_max_isa=None),
            "float32",
            "CPU has no avx512_bf16 or AMX: bf16 matmuls are emulated",
        ),
        (
            CpuFacts(avx512_bf16=False, amx_bf16=False, onednn_max_isa="AVX512_CORE_AMX"),
            "float32",
            "CPU has no avx512_bf16 or AMX: bf16 matmuls are emulated",
        ),
    ],
)
def test_cpu_dtype_follows_the_cpus_bf16_units(facts, dtype, reason):
    choice = cpu_dtype(facts)
    assert (choice.dtype, choice.reason) == (dtype, reason)


@pytest.mark.parametrize(
    "isa, dtype",
    [
        ("AVX2", "float32"),
        ("avx2", "float32"),
        ("AVX2_VNNI_2", "float32"),
        ("AVX512_CORE", "float32"),
        ("AVX512_CORE_VNNI", "float32"),
        ("AVX512_CORE_BF16", "bfloat16"),
        ("AVX512_CORE_AMX", "bfloat16"),
        ("AVX10_1_512", "bfloat16"),
        ("DEFAULT", "bfloat16"),
        ("", "bfloat16"),
    ],
)
def test_a_onednn_isa_cap_below_bf16_means_float32(isa, dtype):
    choice = cpu_dtype(CpuFacts(avx512_bf16=True, amx_bf16=False, onednn_max_isa=isa))
    assert choice.dtype == dtype
    if dtype == "float32":
        assert choice.reason == f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off the CPU's avx512_bf16"


def test_cpu_facts_are_torchs_probe_and_the_inherited_onednn_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    capabilities = torch.cpu.get_capabilities()
    facts = cpu_facts()
    assert facts == CpuFacts(
        avx512_bf16=bool(capabilities.get("avx512_bf16")),
        amx_bf16=bool(capabilities.get("amx_bf16")),
        onednn_max_isa=None,
    )
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name
    assert cpu_facts().onednn_max_isa == "AVX512_CORE"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # wins over the older name, as in oneDNN
    assert cpu_facts().onednn_max_isa == "AVX2"


def test_auto_on_a_cpu_capped_to_avx2_is_float32(monkeypatch):
    # How an AVX2-only machine looks to the workers on any machine: oneDNN, which runs the bf16 matmuls,
    # is kept to AVX2. ATEN_CPU_CAPABILITY alone does not decide: the matmuls stay native bf16 under it.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert auto_dtype("cpu").dtype == "float32"
