"""The engine's next-token distributions equal transformers + peft for a batch mixing adapters.

float32 throughout (bf16 output depends on batch composition). Log-softmax distributions are compared,
which equals comparing logits up to a per-row constant.
"""

from __future__ import annotations

import pytest

from tests.worker.engine_scenario import (
    TINY_LENGTHS,
    TINY_MIX,
    build_runner,
    generation_of,
    run_scenario,
    scenario_prompts,
)
from tests.worker.peft_reference import assert_matches_reference, load_peft_model


def _select_kernels(monkeypatch, native_cpu: bool) -> None:
    """Runners built next take the native CPU kernels (LoRA and attention) where they build, or the
    torch paths, whatever their config says."""
    from worker import kernels

    select_lora, select_attention = kernels.select_lora_ops, kernels.select_attention_kernel
    monkeypatch.setattr(
        "worker.runner.select_lora_ops", lambda device, _native, cache: select_lora(device, native_cpu, cache)
    )
    monkeypatch.setattr(
        "worker.runner.select_attention_kernel",
        lambda device, _native, cache: select_attention(device, native_cpu, cache),
    )


@pytest.mark.parametrize("native_cpu", [True, False], ids=["native", "torch"])
def test_mixed_batch_equals_peft(tiny_model_dir, tiny_adapters, monkeypatch, native_cpu):
    """Both CPU paths: the native kernels (where they build) and the torch path."""
    from worker.kernels.cpu_attention import NativeCpuAttention, load_native_attention
    from worker.kernels.cpu_native import NativeCpuLoraOps, load_native
    from worker.kernels.torch_grouped import GroupedLora

    grouped_calls = []
    grouped_apply = GroupedLora.apply
    monkeypatch.setattr(
        GroupedLora, "apply", lambda self, *a, **k: grouped_calls.append(1) or grouped_apply(self, *a, **k)
    )
    _select_kernels(monkeypatch, native_cpu)
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    native = native_cpu and load_native() is not None
    assert isinstance(runner.lora_ops, NativeCpuLoraOps) == native
    # Where the kernels build, they are the ones in use: in every layer's attention too.
    attention = {type(layer.self_attn.attn.kernel) for layer in runner.model.layers}
    assert attention == {NativeCpuAttention if native_cpu and load_native_attention() else type(None)}
    assert [p.module for p in runner.model.layers[0].self_attn.qkv_proj.lora_site.parts] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    records = run_scenario(runner, slots, prompts)
    assert all(len(r.tokens) >= 3 for r in records.values())
    if not native:
        assert grouped_calls, "decode steps of this mix must take the torch path's grouped (bmm) LoRA path"
    assert_matches_reference(records, load_peft_model(tiny_model_dir, tiny_adapters), atol=1e-4)


@pytest.mark.parametrize("native_cpu", [True, False], ids=["native", "torch"])
def test_join_step_equals_peft(tiny_model_dir, tiny_adapters, monkeypatch, native_cpu):
    """Newcomers prefilled in the same forward as the running batch's decode (prompt rows, then decode
    rows; LoRA applied to both kinds in one call per site by the native kernel, to each kind apart by the
    torch path) give the distributions of transformers + peft."""
    from worker.kernels.cpu_native import load_native
    from worker.lora.batch import SplitLoraBatch
    from worker.models.llama import LlamaForCausalLM

    _select_kernels(monkeypatch, native_cpu)
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    one_call = native_cpu and load_native() is not None
    kinds = []
    forward = LlamaForCausalLM.forward
    runner.model.forward = lambda ids, batch, kv: (
        kinds.append(type(batch.lora)) or forward(runner.model, ids, batch, kv)
    )
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    records = run_scenario(runner, slots, prompts, join_step=True)
    # One forward for both kinds of rows either way (the records below show the newcomers joined).
    assert (SplitLoraBatch in kinds) != one_call
    assert [len(records[rid].tokens) for rid in (len(TINY_MIX) - 2, len(TINY_MIX) - 1)] == [3, 3]
    assert_matches_reference(records, load_peft_model(tiny_model_dir, tiny_adapters), atol=1e-4)


def test_join_step_refuses_a_bad_newcomer_and_changes_nothing(tiny_model_dir, tiny_adapters):
    from worker.runner import PrefillRequest, RequestError

    def start():
        runner, _ = build_runner(tiny_model_dir, {"r4_qv": tiny_adapters["r4_qv"]})
        runner.prefill([PrefillRequest(1, [3, 4, 5], [0], lora_slot=1, adapter_generation=generation_of(1))])
        return runner

    runner = start()
    with pytest.raises(RequestError, match="request 2"):
        runner.step([PrefillRequest(2, [3, 100000], [1])], [1])
    assert 2 not in runner.sequences and runner.sequences[1].num_cached == 3
    # The running sequence goes on exactly as in a runner that never saw the refused step.
    after = runner.step([PrefillRequest(3, [6, 7], [2])], [1])
    clean = start().step([PrefillRequest(3, [6, 7], [2])], [1])
    assert [o.request_id for o in after] == [3, 1]
    assert [(o.token_id, o.logprob) for o in after] == [(o.token_id, o.logprob) for o in clean]


def test_greedy_tokens_same_alone_and_in_mixed_batch(tiny_model_dir, tiny_adapters):
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    prompts = scenario_prompts(runner.hf_config.vocab_size, TINY_MIX, TINY_LENGTHS)
    mixed = run_scenario(runner, slots, prompts)
    # The same request (adapter r16_mlp) alone, with filler base requests so the scenario shape holds.
    alone_prompts = {rid: (None, [5, 6]) for rid in range(len(TINY_MIX))}
    alone_prompts[3] = prompts[3]
    runner2, slots2 = build_runner(tiny_model_dir, {"r16_mlp": tiny_adapters["r16_mlp"]})
    alone = run_scenario(runner2, slots2, alone_prompts)
    assert alone[3].tokens == mixed[3].tokens


def test_empty_slot_and_bad_requests_are_refused(tiny_model_dir, tiny_adapters):
    from worker.runner import PrefillRequest, RequestError

    runner, slots = build_runner(tiny_model_dir, {"r4_qv": tiny_adapters["r4_qv"]}, num_slots=2)
    with pytest.raises(RequestError, match="no adapter is loaded in slot 2"):
        runner.prefill([PrefillRequest(1, [3, 4], [0], lora_slot=2, adapter_generation=generation_of(2))])
    with pytest.raises(RequestError, match="cannot hold"):
        runner.prefill([PrefillRequest(2, list(range(3, 12)), [0])])
    with pytest.raises(RequestError, match="token ids"):
        runner.prefill([PrefillRequest(3, [3, 100000], [0])])
    with pytest.raises(RequestError, match="not running"):
        runner.decode([42])
