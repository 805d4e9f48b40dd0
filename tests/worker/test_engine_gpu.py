"""On a CUDA device (TP=1, CUDA LoRA kernels), the engine equals transformers + peft on the CPU."""

from __future__ import annotations

import pytest

from tests.worker.engine_scenario import TINY_LENGTHS, TINY_MIX, build_runner, run_scenario, scenario_prompts
from tests.worker.peft_reference import assert_matches_reference, load_peft_model

pytestmark = pytest.mark.gpu


def test_cuda_engine_equals_peft(tiny_model_dir, tiny_adapters):
    from worker.kernels.cuda import CudaLoraOps

    runner, slots = build_runner(tiny_model_dir, tiny_adapters, device="cuda")
    assert isinstance(runner.lora_ops, CudaLoraOps)
    assert not runner.lora_ops.decode_uses_segments  # decode really takes the bgmv kernels
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    records = run_scenario(runner, slots, prompts)
    assert_matches_reference(records, load_peft_model(tiny_model_dir, tiny_adapters), atol=2e-4)


def test_cuda_kv_cache_takes_what_the_fraction_leaves(tiny_model_dir):
    """Without a KV size the runner profiles and sizes its cache; after that, everything on the device
    (this process's allocator and others) stays within the fraction, and a step still runs."""
    import torch

    from worker.config import WorkerConfig
    from worker.runner import ModelRunner, PrefillRequest

    fraction = 0.3  # well below what any other process holds, so the check is of our own arithmetic
    config = WorkerConfig(
        model_dir=tiny_model_dir,
        dtype="float32",
        device="cuda",
        kv_cache_bytes=None,
        memory_fraction=fraction,
    )
    runner = ModelRunner(config)
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert runner.kv.num_blocks > 1000
    assert used <= fraction * total + (64 << 20), (used, total)
    out = runner.prefill([PrefillRequest(1, [5, 6, 7], [runner.kv.num_blocks - 1])])
    assert len(out) == 1
