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
