"""Shared fixtures: tiny random Llama models and PEFT adapters built once per session."""

from __future__ import annotations

import pytest
import torch

from tests.adapter_factory import save_random_adapter, save_random_model, tiny_llama_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight tiny Llama (8 heads, 4 KV heads, vocab 251, MLP 150) in float32."""
    return save_random_model(tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    """Adapters over the tiny model covering ranks, target subsets, alpha != r, rsLoRA, partial layers."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    specs = {
        "r4_qv": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        "r8_all": dict(r=8, alpha=8),
        "r16_mlp": dict(r=16, alpha=32, target_modules=("gate_proj", "up_proj", "down_proj")),
        "r64_rs": dict(r=64, alpha=16, use_rslora=True),
        "r8_layer1": dict(
            r=8, alpha=16, target_modules=("q_proj", "o_proj", "down_proj"), layers_to_transform=[1]
        ),
    }
    return {
        name: save_random_adapter(tiny_model_dir, root / name, seed=i + 1, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model converted from its GGUF once into the user cache (reused across runs)."""
    from pathlib import Path

    from launch.model_source import DEFAULT_CACHE_DIR, prepare_default_model

    return prepare_default_model(Path(DEFAULT_CACHE_DIR).expanduser())
