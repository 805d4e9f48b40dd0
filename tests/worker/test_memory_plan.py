"""The KV cache planned from device memory: the budget's arithmetic, and a runner that profiles its
largest step before sizing its cache (on the CPU, with a meter that reports a GPU's readings)."""

from __future__ import annotations

import pytest
import torch

from tests.worker.engine_scenario import BLOCK_SIZE, build_runner
from worker.config import WorkerConfig
from worker.kv_cache import bytes_per_block
from worker.memory_plan import GIB, MemoryReading, kv_cache_budget, memory_meter_for
from worker.runner import ModelRunner, PrefillRequest


def test_budget_is_the_fraction_less_the_peak_and_what_others_hold():
    reading = MemoryReading(total=80 * GIB, free=50 * GIB, reserved=28 * GIB, peak=20 * GIB)
    # others: 80 - 50 - 28 = 2 GiB; allowed 72 GiB; the peak less the 1 GiB profile cache: 19 GiB.
    assert kv_cache_budget(reading, 0.9, profile_cache_bytes=GIB) == int(80 * GIB * 0.9) - 19 * GIB - 2 * GIB


def test_no_room_left_names_the_settings():
    reading = MemoryReading(total=16 * GIB, free=1 * GIB, reserved=15 * GIB, peak=15 * GIB)
    with pytest.raises(ValueError, match="no device memory is left.*CUDA_MEMORY_FRACTION.*KV_CACHE_MEMORY"):
        kv_cache_budget(reading, 0.9, profile_cache_bytes=0)


def test_planning_needs_a_cuda_device():
    with pytest.raises(ValueError, match="only on CUDA"):
        memory_meter_for(torch.device("cpu"))


class ScriptedMeter:
    """A meter that reports fixed readings and records when the runner reset and released."""

    def __init__(self, reading: MemoryReading):
        self.reading, self.calls = reading, []

    def reset_peak(self):
        self.calls.append("reset_peak")

    def release_cached(self):
        self.calls.append("release_cached")

    def read(self) -> MemoryReading:
        self.calls.append("read")
        return self.reading


def test_runner_profiles_its_largest_step_then_sizes_the_cache(tiny_model_dir, monkeypatch):
    steps = []
    real_step = ModelRunner.step

    def spy(self, new, request_ids, grown=None):
        steps.append([(len(r.token_ids), r.prompt_logprobs) for r in new])
        return real_step(self, new, request_ids, grown)

    monkeypatch.setattr(ModelRunner, "step", spy)
    reading = MemoryReading(total=GIB, free=GIB // 2, reserved=GIB // 4, peak=GIB // 8)
    meter = ScriptedMeter(reading)
    config = WorkerConfig(
        model_dir=tiny_model_dir,
        dtype="float32",
        block_size=BLOCK_SIZE,
        kv_cache_bytes=None,
        memory_fraction=0.5,
        profile_tokens=100,
    )
    runner = ModelRunner(config, memory_meter=meter)
    c = runner.hf_config
    per_block = bytes_per_block(
        c.num_hidden_layers,
        BLOCK_SIZE,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        torch.float32,
    )
    profile_blocks = -(-100 // BLOCK_SIZE)
    expected = (GIB // 2 - (GIB // 8 - profile_blocks * per_block) - GIB // 4) // per_block
    assert runner.kv.num_blocks == expected
    assert steps == [[(100, True)]]  # one step of profile_tokens prompt rows, every row's logits
    assert meter.calls == ["reset_peak", "release_cached", "read"]
    assert runner.sequences == {}

    # The profile leaves nothing behind: the runner generates what one given its cache size does.
    reference, _ = build_runner(tiny_model_dir, {})
    prompt = PrefillRequest(7, [3, 14, 15, 92, 65], [0, 1, 2])
    expect = [reference.prefill([prompt])[0].token_id]
    got = [runner.prefill([prompt])[0].token_id]
    for _ in range(5):
        expect.append(reference.decode([7])[0].token_id)
        got.append(runner.decode([7])[0].token_id)
    assert got == expect


def test_profile_is_clamped_to_the_model_context(tiny_model_dir, monkeypatch):
    lengths = []
    real_step = ModelRunner.step
    monkeypatch.setattr(
        ModelRunner,
        "step",
        lambda self, new, ids, grown=None: (
            lengths.extend(len(r.token_ids) for r in new) or real_step(self, new, ids, grown)
        ),
    )
    config = WorkerConfig(
        model_dir=tiny_model_dir, dtype="float32", kv_cache_bytes=None, profile_tokens=10**6
    )
    meter = ScriptedMeter(MemoryReading(total=GIB, free=GIB, reserved=0, peak=0))
    runner = ModelRunner(config, memory_meter=meter)
    assert lengths == [runner.hf_config.max_position_embeddings]
