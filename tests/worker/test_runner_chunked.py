"""Runner-level chunked prefill: a prompt fed in chunks (`num_cached`, `more_chunks`), each in a join step
with another sequence's decode and its blocks handed out chunk by chunk, gives exactly the output of the
same prompt prefilled whole: tokens, logprobs, top tokens and prompt logprobs (float32), greedy and
seeded sampling with penalties, with and without an adapter; the greedy run also equals
transformers+peft. A chunked recompute after preemption resumes as an unchunked one does."""

from __future__ import annotations

import math

import pytest
import torch

from tests.worker.engine_scenario import BLOCK_SIZE, Record, build_runner, generation_of
from tests.worker.peft_reference import assert_matches_reference, load_peft_model
from worker.errors import RequestError
from worker.runner import PrefillRequest
from worker.sampler import SamplingParams

PROMPT = [(7 * i + 3) % 250 for i in range(23)]
CHUNKS = [5, 8, 10]  # uneven, and not on block boundaries (BLOCK_SIZE 4)
STEPS = 6
NEIGHBOUR = [31, 32, 33, 34, 35]  # a running sequence that decodes in the chunks' steps
CASES = {
    "greedy": SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2, top_n_tokens=5),
    "sampled": SamplingParams(
        do_sample=True, temperature=1.4, top_k=60, seed=77, repetition_penalty=1.2, top_n_tokens=5
    ),
}


class _PromptsToSdpa:
    """The native kernel for decode rows only, as a bf16 model has it (`takes_prompts`)."""

    def __init__(self, kernel):
        self.paged_attention = kernel.paged_attention

    @staticmethod
    def takes_prompts(dtype) -> bool:
        return False


@pytest.fixture(scope="module", params=["native", "native-decode", "torch"])
def runner_slots(request, tiny_model_dir, tiny_adapters):
    """With the native attention kernel (where it builds) for every row, for decode rows only (prompt
    rows in SDPA, as in bf16), and with the torch path's."""
    runner, slots = build_runner(tiny_model_dir, {"r8_all": tiny_adapters["r8_all"]})
    for layer in runner.model.layers:
        attn = layer.self_attn.attn
        if request.param == "torch":
            attn.kernel = None
        elif request.param == "native-decode" and attn.kernel is not None:
            attn.kernel = _PromptsToSdpa(attn.kernel)
    return runner, slots


def _blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK_SIZE)))


def _request(rid, tokens, table, params, slot, **kw) -> PrefillRequest:
    return PrefillRequest(rid, tokens, table, params, slot, adapter_generation=generation_of(slot), **kw)


def _decode_rest(runner, rid: int, outputs: list) -> list:
    while len(outputs) < STEPS:
        outputs.append(runner.decode([rid])[0])
    runner.release([rid])
    return outputs


def _whole(runner, params, slot, logprobs: bool) -> list:
    req = _request(1, PROMPT, _blocks(0, len(PROMPT) + STEPS), params, slot, prompt_logprobs=logprobs)
    return _decode_rest(runner, 1, [runner.prefill([req])[0]])


def _chunked(runner, params, slot, logprobs: bool, chunks=CHUNKS, first_block=40) -> list:
    """PROMPT in `chunks`, each joining a step of NEIGHBOUR's decode, blocks grown chunk by chunk."""
    neighbour = PrefillRequest(9, NEIGHBOUR, _blocks(80, len(NEIGHBOUR) + len(chunks) + 1))
    runner.prefill([neighbour])
    cached, outputs = 0, []
    for i, size in enumerate(chunks):
        table = _blocks(first_block, cached + size)
        more = i < len(chunks) - 1
        req = _request(
            2, PROMPT[cached : cached + size], table, params, slot,
            prompt_logprobs=logprobs, num_cached=cached, more_chunks=more,
        )  # fmt: skip
        out = runner.step([req], [9])
        assert [o.request_id for o in out] == ([9] if more else [2, 9]), "only the last chunk samples"
        cached += size
        if not more:
            outputs.append(out[0])
    runner.release([9])
    table = _blocks(first_block, len(PROMPT) + STEPS)
    outputs.append(runner.step([], [2], {2: table})[0])
    return _decode_rest(runner, 2, outputs)


def _assert_same(got: list, want: list) -> None:
    assert [o.token_id for o in got] == [o.token_id for o in want]
    assert [o.top_token_ids for o in got] == [o.top_token_ids for o in want]
    torch.testing.assert_close(
        torch.tensor([o.logprob for o in got]), torch.tensor([o.logprob for o in want]), atol=1e-5, rtol=0
    )
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if w.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(PROMPT) - 1
            torch.testing.assert_close(
                torch.tensor(g.prompt_logprobs), torch.tensor(w.prompt_logprobs), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("adapter", [None, "r8_all"])
@pytest.mark.parametrize("logprobs", [False, True])
def test_chunked_equals_whole(runner_slots, case, adapter, logprobs):
    runner, slots = runner_slots
    slot = slots.get(adapter, 0)
    want = _whole(runner, CASES[case], slot, logprobs)
    _assert_same(_chunked(runner, CASES[case], slot, logprobs), want)
    assert not runner.sequences


def test_one_token_chunks_equal_whole(runner_slots):
    runner, _ = runner_slots
    want = _whole(runner, CASES["sampled"], 0, True)
    _assert_same(_chunked(runner, CASES["sampled"], 0, True, chunks=[1] * len(PROMPT)), want)


def test_chunked_greedy_equals_peft(runner_slots, tiny_model_dir, tiny_adapters):
    runner, slots = runner_slots
    vocab = runner.hf_config.vocab_size
    model = load_peft_model(tiny_model_dir, {"r8_all": tiny_adapters["r8_all"]})
    records = {}
    for adapter in (None, "r8_all"):
        outputs = _chunked(runner, SamplingParams(top_n_tokens=vocab), slots.get(adapter, 0), False)
        rec = Record(adapter, PROMPT)
        for o in outputs:
            dist = torch.full((vocab,), -math.inf)
            dist[torch.tensor(o.top_token_ids)] = torch.tensor(o.top_logprobs)
            rec.tokens.append(o.token_id)
            rec.logprobs.append(dist)
        records[len(records)] = rec
    assert_matches_reference(records, model, atol=2e-4)


def test_chunked_recompute_resumes_like_a_whole_one(runner_slots):
    runner, _ = runner_slots
    params = CASES["sampled"]
    expected = [o.token_id for o in _whole(runner, params, 0, False)]
    context = PROMPT + expected[:3]
    table = _blocks(0, len(context) + STEPS)
    first = PrefillRequest(3, context[:10], table, params, more_chunks=True, num_generated=3)
    assert runner.prefill([first]) == []
    last = PrefillRequest(3, context[10:], table, params, num_cached=10, num_generated=3)
    tokens = [runner.prefill([last])[0].token_id]
    while len(tokens) < STEPS - 3:
        tokens.append(runner.decode([3])[0].token_id)
    runner.release([3])
    assert tokens == expected[3:]


def test_chunks_out_of_order_or_decoded_early_are_refused(runner_slots):
    runner, _ = runner_slots
    table = _blocks(0, len(PROMPT))
    runner.prefill([PrefillRequest(4, PROMPT[:8], table, more_chunks=True)])
    with pytest.raises(RequestError, match="chunks still to come"):
        runner.decode([4])
    with pytest.raises(RequestError, match="starts at token 4, 8 are cached"):
        runner.prefill([PrefillRequest(4, PROMPT[4:], table, num_cached=4)])
    with pytest.raises(RequestError, match="no sequence prefilling"):
        runner.prefill([PrefillRequest(5, PROMPT[8:], table, num_cached=8)])
    with pytest.raises(RequestError, match="does not extend"):
        runner.prefill([PrefillRequest(4, PROMPT[8:], _blocks(50, len(PROMPT)), num_cached=8)])
    assert runner.sequences[4].num_cached == 8  # nothing changed
    out = runner.prefill([PrefillRequest(4, PROMPT[8:], table, num_cached=8)])
    assert [o.request_id for o in out] == [4]
    runner.release([4])
