"""Runner-level sampling: prompt logprobs against peft, and seeded sampling independent of the batch."""

from __future__ import annotations

import torch

from tests.worker.engine_scenario import build_runner, generation_of
from tests.worker.peft_reference import load_peft_model
from worker.runner import PrefillRequest
from worker.sampler import SamplingParams


def test_prompt_logprobs_equal_peft(tiny_model_dir, tiny_adapters):
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    prompt = [5, 17, 42, 9, 100, 3, 77]
    out = runner.prefill(
        [
            _on(PrefillRequest(1, prompt, [0, 1], lora_slot=slots["r8_all"], prompt_logprobs=True)),
            _on(PrefillRequest(2, [8, 9, 10], [2], lora_slot=slots["r4_qv"])),
        ]
    )
    model = load_peft_model(tiny_model_dir, tiny_adapters)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), adapter_names=["r8_all"]).logits[0]
    expected = (
        torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    )
    assert len(out[0].prompt_logprobs) == len(prompt) - 1
    assert torch.allclose(torch.tensor(out[0].prompt_logprobs), expected, atol=1e-4)
    assert out[1].prompt_logprobs is None


def _on(request: PrefillRequest) -> PrefillRequest:
    """`request` expecting the generation build_runner loaded into its slot."""
    request.adapter_generation = generation_of(request.lora_slot)
    return request


def _sample(runner, requests, steps):
    tokens = {r.request_id: [] for r in requests}
    for o in runner.prefill(requests):
        tokens[o.request_id].append(o.token_id)
    ids = [r.request_id for r in requests]
    for _ in range(steps):
        for o in runner.decode(ids):
            tokens[o.request_id].append(o.token_id)
    runner.release(ids)
    return tokens


def test_seeded_sampling_is_independent_of_the_batch(tiny_model_dir, tiny_adapters):
    runner, slots = build_runner(tiny_model_dir, tiny_adapters)
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=1234)
    prompt = [11, 12, 13, 14]
    alone = _sample(runner, [_on(PrefillRequest(1, prompt, [0, 1, 2], params, slots["r16_mlp"]))], steps=6)
    others = [
        _on(PrefillRequest(rid, [20 + rid] * (rid + 1), [3 * rid, 3 * rid + 1, 3 * rid + 2], p, s))
        for rid, p, s in [
            (2, SamplingParams(do_sample=True, seed=99), slots["r4_qv"]),
            (3, SamplingParams(), 0),
            (4, SamplingParams(do_sample=True, temperature=0.7, seed=5), slots["r64_rs"]),
        ]
    ]
    target = _on(PrefillRequest(5, prompt, [15, 16, 17], params, slots["r16_mlp"]))
    mixed = _sample(runner, [others[0], target, *others[1:]], steps=6)
    assert mixed[5] == alone[1]
    # A different seed gives a different continuation (the seed is really used).
    reseeded = _on(
        PrefillRequest(
            6, prompt, [0, 1, 2], SamplingParams(**{**_fields(params), "seed": 4321}), slots["r16_mlp"]
        )
    )
    assert _sample(runner, [reseeded], steps=6)[6] != alone[1]


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__slots__}


def test_top_n_larger_than_the_sampled_support_reports_only_live_tokens(tiny_model_dir):
    runner, _ = build_runner(tiny_model_dir, {})
    params = SamplingParams(do_sample=True, top_k=3, top_n_tokens=5, seed=1)
    out = runner.prefill([PrefillRequest(1, [4, 5, 6], [0], params)])[0]
    assert len(out.top_token_ids) == len(out.top_logprobs) == 3
    assert all(t >= 0 for t in out.top_token_ids) and out.token_id in out.top_token_ids
