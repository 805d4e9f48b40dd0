"""E2E fixtures: a tiny random Llama that speaks SmolLM2's tokenizer, and random adapters for it."""

from __future__ import annotations

import pytest

from tests.adapter_factory import save_random_adapter, tiny_chat_model


@pytest.fixture(scope="session")
def e2e_model_dir(smollm2_dir, tmp_path_factory):
    """The tiny test Llama (3 layers, hidden 64) with SmolLM2's vocabulary and tokenizer files.

    The router needs a real tokenizer; SmolLM2's ids 0/1/2 (unk, bos, eos) match the tiny config's.
    """
    return tiny_chat_model(smollm2_dir, tmp_path_factory.mktemp("e2e-tiny-llama"))


@pytest.fixture(scope="session")
def e2e_adapters(e2e_model_dir, tmp_path_factory):
    """Three adapters of different ranks and targets (ids: a_r4, b_r8, c_r16)."""
    root = tmp_path_factory.mktemp("e2e-adapters")
    specs = {
        "a_r4": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        "b_r8": dict(r=8, alpha=16),
        "c_r16": dict(r=16, alpha=16, target_modules=("o_proj", "gate_proj", "down_proj")),
    }
    return {
        name: save_random_adapter(e2e_model_dir, root / name, seed=10 + i, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }
