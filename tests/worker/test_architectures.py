"""Mistral (sliding window) and Qwen2 (q/k/v bias) equal transformers + peft, Mistral's window also for a
prompt prefilled in chunks; others are refused."""

from __future__ import annotations

import math

import pytest
import torch

from tests.adapter_factory import save_random_adapter, save_random_model
from tests.worker.engine_scenario import (
    BLOCK_SIZE,
    TINY_LENGTHS,
    TINY_MIX,
    Record,
    build_runner,
    generation_of,
    run_scenario,
    scenario_prompts,
)
from tests.worker.peft_reference import assert_matches_reference, load_peft_model
from worker.runner import PrefillRequest
from worker.sampler import SamplingParams

COMMON = dict(
    vocab_size=199,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _config(arch: str):
    if arch == "mistral":
        from transformers import MistralConfig

        # A window shorter than the prompts, so the sliding-window mask really cuts.
        return MistralConfig(sliding_window=6, **COMMON)
    from transformers import Qwen2Config

    return Qwen2Config(use_sliding_window=False, **COMMON)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_architecture_equals_peft(arch, tmp_path):
    model_dir = save_random_model(_config(arch), tmp_path / "m", seed=5)
    if arch == "qwen2":  # make sure the biases are really loaded and matter
        from safetensors.torch import load_file

        tensors = load_file(model_dir / "model.safetensors")
        assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    adapters = {
        "a": save_random_adapter(model_dir, tmp_path / "a", r=8, alpha=16, seed=6),
        "b": save_random_adapter(
            model_dir, tmp_path / "b", r=4, alpha=4, target_modules=["k_proj", "o_proj"]
        ),
    }
    runner, slots = build_runner(model_dir, adapters)
    mix = [None, "a", "b", "a", "b", None]
    prompts = scenario_prompts(runner.hf_config.vocab_size, mix, [9, 12, 3, 7, 10, 5])
    records = run_scenario(runner, slots, prompts)
    assert_matches_reference(records, load_peft_model(model_dir, adapters), atol=1e-4)


@pytest.mark.parametrize("attention", ["native", "torch"])
def test_sliding_window_over_chunks_equals_peft(attention, tmp_path):
    """A 23-token prompt in chunks of 5, 8 and 10 beside another sequence's decode, with a window of 6:
    every later chunk's rows see the cached tokens of earlier chunks only within the window."""
    model_dir = save_random_model(_config("mistral"), tmp_path / "m", seed=5)
    adapters = {"a": save_random_adapter(model_dir, tmp_path / "a", r=8, alpha=16, seed=6)}
    runner, slots = build_runner(model_dir, adapters)
    if attention == "torch":
        for layer in runner.model.layers:
            layer.self_attn.attn.kernel = None
    vocab = runner.hf_config.vocab_size
    params = SamplingParams(top_n_tokens=vocab)
    prompt = [(7 * i + 3) % vocab for i in range(23)]
    blocks = list(range(10, 10 + -(-(len(prompt) + 6) // BLOCK_SIZE)))
    runner.prefill([PrefillRequest(9, [5, 6, 7, 8, 9], [0, 1, 2, 3])])  # the neighbour decoding beside
    cached, outputs = 0, []
    for size in (5, 8, 10):
        more = cached + size < len(prompt)
        chunk = PrefillRequest(
            2, prompt[cached : cached + size], blocks, params, slots["a"],
            adapter_generation=generation_of(slots["a"]), num_cached=cached, more_chunks=more,
        )  # fmt: skip
        outputs += runner.step([chunk], [9])[:-1]
        cached += size
    while len(outputs) < 6:
        outputs += runner.decode([2])
    rec = Record("a", prompt)
    for o in outputs:
        dist = torch.full((vocab,), -math.inf)
        dist[torch.tensor(o.top_token_ids)] = torch.tensor(o.top_logprobs)
        rec.tokens.append(o.token_id)
        rec.logprobs.append(dist)
    assert_matches_reference({2: rec}, load_peft_model(model_dir, adapters), atol=1e-4)


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    from worker.config import WorkerConfig
    from worker.runner import ModelRunner

    model_dir = save_random_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50), tmp_path / "g")
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"):
        ModelRunner(WorkerConfig(model_dir=model_dir, dtype="float32", num_blocks=4))


def test_half_precision_runs_close_to_float32(tiny_model_dir, tiny_adapters):
    """bf16 and fp16 serve the same batch; their distributions stay near the float32 ones."""
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    ref = run_scenario(runner, slots, prompts)
    for dtype in ("bfloat16", "float16"):
        half, half_slots = build_runner(tiny_model_dir, tiny_adapters, dtype=dtype)
        records = run_scenario(half, half_slots, prompts)
        first = torch.stack([r.logprobs[0] for r in records.values()])
        expected = torch.stack([r.logprobs[0] for r in ref.values()])
        assert (first.exp() - expected.exp()).abs().max() < 0.05, dtype
