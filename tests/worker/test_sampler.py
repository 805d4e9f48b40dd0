"""worker/sampler.py against independent references: transformers' logits processors applied row by
row with each row's own parameters, and a plain-loop frequency penalty."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from worker.sampler import (
    PAD_TOKEN_ID,
    Sampler,
    SamplingParams,
    SequenceSamplingState,
    _draw,
    prompt_logprobs,
)

VOCAB = 50

MIXED = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3, top_n_tokens=3),
    SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=1, top_n_tokens=5),
    SamplingParams(do_sample=True, top_p=0.8, repetition_penalty=1.2, frequency_penalty=0.5, seed=2),
    SamplingParams(do_sample=True, typical_p=0.6, temperature=1.5, seed=3, top_n_tokens=2),
    SamplingParams(
        do_sample=True,
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        typical_p=0.9,
        repetition_penalty=0.8,
        frequency_penalty=-0.3,
        seed=4,
    ),
    SamplingParams(do_sample=True, top_k=1000, seed=5),
    SamplingParams(do_sample=True, top_k=2, seed=6, top_n_tokens=4),
    # Warper fields on a greedy row are ignored: greedy is the argmax of the penalised logits.
    SamplingParams(temperature=0.5, top_k=3, typical_p=0.5, frequency_penalty=1.0, top_n_tokens=1),
]


def reference_logprobs(logits: torch.Tensor, history: list[int], params: SamplingParams) -> torch.Tensor:
    """[vocab] log-probs of one row, from transformers' processors and a loop frequency penalty."""
    scores = logits[None].clone()  # [1, vocab]
    input_ids = torch.tensor([history])  # [1, len]
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(input_ids, scores)
    if params.frequency_penalty != 0.0:
        for token in set(history):
            scores[0, token] -= params.frequency_penalty * history.count(token)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = TemperatureLogitsWarper(float(params.temperature))(input_ids, scores)
        if params.top_k > 0:
            scores = TopKLogitsWarper(params.top_k)(input_ids, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(input_ids, scores)
        if params.typical_p < 1.0:
            scores = TypicalLogitsWarper(params.typical_p)(input_ids, scores)
    return torch.log_softmax(scores, dim=-1)[0]


def assert_same_distribution(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-5)


def make_prompts(generator: torch.Generator, batch: int) -> list[list[int]]:
    # Small id range so prompts repeat tokens and penalties see counts above 1.
    return [torch.randint(0, 12, (7 + i,), generator=generator).tolist() for i in range(batch)]


def test_mixed_batch_matches_transformers_over_steps():
    gen = torch.Generator().manual_seed(0)
    histories = make_prompts(gen, len(MIXED))
    states = [SequenceSamplingState(p, h) for p, h in zip(MIXED, histories, strict=True)]
    sampler = Sampler()
    max_top_n = max(p.top_n_tokens for p in MIXED)
    for _ in range(6):
        logits = 3 * torch.randn(len(MIXED), VOCAB, generator=gen)  # [batch, vocab]
        original = logits.clone()
        refs = [reference_logprobs(logits[i], histories[i], p) for i, p in enumerate(MIXED)]

        processed = torch.log_softmax(sampler.process(logits, MIXED, states), dim=-1)
        for i, ref in enumerate(refs):
            assert_same_distribution(processed[i], ref)

        out = sampler(logits, MIXED, states)
        assert torch.equal(logits, original)
        assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (len(MIXED),)
        assert out.logprobs.dtype == torch.float32
        assert out.top_token_ids.shape == out.top_logprobs.shape == (len(MIXED), max_top_n)
        for i, (params, ref) in enumerate(zip(MIXED, refs, strict=True)):
            token = int(out.token_ids[i])
            if not params.do_sample:
                assert token == int(ref.argmax())
            assert math.isfinite(ref[token])
            torch.testing.assert_close(out.logprobs[i], ref[token], rtol=1e-5, atol=1e-5)
            check_top_n(out.top_token_ids[i], out.top_logprobs[i], ref, params.top_n_tokens)
            histories[i].append(token)


def check_top_n(ids: torch.Tensor, logprobs: torch.Tensor, ref: torch.Tensor, n: int) -> None:
    values, expected_ids = torch.topk(ref, n)
    valid = int(torch.isfinite(values).sum())
    assert torch.equal(ids[:valid], expected_ids[:valid])
    torch.testing.assert_close(logprobs[:valid], values[:valid], rtol=1e-5, atol=1e-5)
    assert torch.all(logprobs[:valid][:-1] >= logprobs[:valid][1:])
    assert torch.all(ids[valid:] == PAD_TOKEN_ID)
    assert torch.all(logprobs[valid:] == float("-inf"))


def test_top_n_padding_when_support_is_small():
    params = [SamplingParams(do_sample=True, top_k=2, top_n_tokens=4), SamplingParams(top_n_tokens=1)]
    states = [SequenceSamplingState(p, [0]) for p in params]
    out = Sampler()(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1)), params, states)
    assert out.top_token_ids[0, 2:].tolist() == [PAD_TOKEN_ID] * 2
    assert out.top_token_ids[1, 1:].tolist() == [PAD_TOKEN_ID] * 3
    assert torch.isfinite(out.top_logprobs[0, :2]).all() and torch.isfinite(out.top_logprobs[1, :1]).all()


def run_steps(params: list[SamplingParams], target: int, target_logits: torch.Tensor, seed: int) -> list[int]:
    """Tokens of row `target` over steps, the other rows getting unrelated random logits."""
    gen = torch.Generator().manual_seed(seed)
    states = [SequenceSamplingState(p, [1, 2, 3, 2]) for p in params]
    sampler = Sampler()
    tokens = []
    for step_logits in target_logits:
        logits = 3 * torch.randn(len(params), VOCAB, generator=gen)  # [batch, vocab]
        logits[target] = step_logits
        tokens.append(int(sampler(logits, params, states).token_ids[target]))
    return tokens


def test_seeded_sampling_is_independent_of_batch_composition():
    target = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, repetition_penalty=1.1, seed=1234)
    target_logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2))  # [steps, vocab]
    others = [
        SamplingParams(do_sample=True, seed=7),
        SamplingParams(),
        SamplingParams(do_sample=True, top_k=4, frequency_penalty=0.2, seed=8),
        SamplingParams(do_sample=True, temperature=2.0, seed=1234),
    ]
    alone = run_steps([target], 0, target_logits, seed=10)
    assert alone == run_steps([target], 0, target_logits, seed=11)
    assert alone == run_steps([*others[:3], target, others[3]], 3, target_logits, seed=12)
    assert alone == run_steps([target, *reversed(others)], 0, target_logits, seed=13)
    other_seed = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, repetition_penalty=1.1, seed=99)
    assert alone != run_steps([other_seed], 0, target_logits, seed=10)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, top_k=8),
        SamplingParams(do_sample=True, top_p=0.7),
        SamplingParams(do_sample=True, typical_p=0.5),
        SamplingParams(do_sample=True, temperature=2.0, top_k=12, top_p=0.9, repetition_penalty=1.5),
    ],
)
def test_empirical_frequencies_match_processed_distribution(params):
    num_draws, vocab = 3000, 32
    logits = 2 * torch.randn(vocab, generator=torch.Generator().manual_seed(3))  # [vocab]
    prompt = [0, 1, 2, 3]
    ref = reference_logprobs(logits, prompt, params)
    batch_params = [SamplingParams(**{**_fields(params), "seed": seed}) for seed in range(num_draws)]
    states = [SequenceSamplingState(p, prompt) for p in batch_params]
    out = Sampler()(logits.expand(num_draws, vocab).contiguous(), batch_params, states)

    probs = ref.exp()
    assert torch.all(probs[out.token_ids] > 0), "sampled a token outside the top-k/top-p support"
    observed = torch.bincount(out.token_ids, minlength=vocab).double()  # [vocab]
    expected = probs.double() * num_draws
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)), (chi2, dof)


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in SamplingParams.__dataclass_fields__}


def test_draw_is_inverse_cdf_and_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.25] * 4 + [0.0]])
    expected = {0.0: [1, 2, 0], 0.3: [1, 2, 1], 0.6: [3, 2, 2], 0.9: [3, 2, 3]}
    for u, tokens in expected.items():
        assert _draw(probs, torch.full((3,), u, dtype=torch.float64)).tolist() == tokens
    for u in (1 - 2**-53, 1 - 2**-30, 1 - 1e-7):  # rounds to the very end of the float32 CDF
        chosen = _draw(probs, torch.full((3,), u, dtype=torch.float64))
        assert torch.all(probs.gather(1, chosen[:, None]) > 0)


def test_penalty_counts_follow_sequences_across_changing_batches():
    gen = torch.Generator().manual_seed(5)
    params = [
        SamplingParams(repetition_penalty=1.4, frequency_penalty=0.3),
        SamplingParams(do_sample=True, frequency_penalty=0.7, seed=3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(do_sample=True, repetition_penalty=1.2, top_k=5, seed=4),
        SamplingParams(do_sample=True, seed=5),
    ]
    histories = make_prompts(gen, len(params))
    states = [SequenceSamplingState(p, h) for p, h in zip(params, histories, strict=True)]
    samplers = [Sampler(), Sampler()]  # e.g. a prefill and a decode path sharing sequences
    schedule = [(0, [0, 1, 2, 3, 4]), (0, [0, 1, 2, 3, 4]), (0, [2, 0]), (1, [0, 4, 3]), (0, [2, 0])]
    schedule += [(0, [3, 1, 0]), (1, [1]), (0, [0, 1, 2, 3]), (0, [3, 2, 1, 0]), (0, [3, 2, 1, 0])]
    for which, rows in schedule:
        sampler, row_params, row_states = (
            samplers[which],
            [params[i] for i in rows],
            [states[i] for i in rows],
        )
        logits = 3 * torch.randn(len(rows), VOCAB, generator=gen)  # [len(rows), vocab]
        processed = torch.log_softmax(sampler.process(logits, row_params, row_states), dim=-1)
        for j, i in enumerate(rows):
            assert_same_distribution(processed[j], reference_logprobs(logits[j], histories[i], params[i]))
        for j, token in enumerate(sampler(logits, row_params, row_states).token_ids.tolist()):
            histories[rows[j]].append(token)
    for params_i, state, history in zip(params, states, histories, strict=True):
        if params_i.uses_penalties:
            expected = torch.bincount(torch.tensor(history), minlength=VOCAB).float()
            assert torch.equal(state.counts(VOCAB, torch.device("cpu")), expected)


def test_penalties_count_prompt_and_early_appends():
    params = SamplingParams(frequency_penalty=1.0)
    state = SequenceSamplingState(params, torch.tensor([4, 4, 9]))
    state.append(9)
    logits = torch.zeros(1, 12)
    scores = Sampler().process(logits, [params], [state])
    expected = torch.zeros(12)
    expected[4] = expected[9] = -2.0
    assert torch.equal(scores[0], expected)


def test_no_processing_returns_logits_unchanged():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(top_k=3), SamplingParams(do_sample=True)]
    states = [SequenceSamplingState(p, [1]) for p in params]
    assert Sampler().process(logits, params, states) is logits


def test_state_without_counts_rejects_penalised_params():
    state = SequenceSamplingState(SamplingParams(), [1, 2])
    with pytest.raises(ValueError, match="penalty"):
        Sampler()(torch.randn(1, VOCAB), [SamplingParams(repetition_penalty=1.2)], [state])


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError, match="batch"):
        Sampler()(torch.randn(2, VOCAB), [SamplingParams()], [SequenceSamplingState(SamplingParams(), [])])


def test_prompt_token_out_of_vocab_raises():
    state = SequenceSamplingState(SamplingParams(repetition_penalty=1.1), [3, VOCAB])
    with pytest.raises(ValueError, match="token ids"):
        Sampler()(torch.randn(1, VOCAB), [state.params], [state])


@pytest.mark.parametrize("chunk_size", [1024, 8])
def test_prompt_logprobs_matches_loop(chunk_size):
    gen = torch.Generator().manual_seed(4)
    logits = 4 * torch.randn(37, VOCAB, generator=gen)  # [num_tokens, vocab]
    next_ids = torch.randint(0, VOCAB, (37,), generator=gen)  # [num_tokens]
    expected = torch.stack([torch.log_softmax(logits[i], dim=-1)[next_ids[i]] for i in range(37)])
    actual = prompt_logprobs(logits, next_ids, chunk_size=chunk_size)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("do_sample", 1),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("typical_p", 0.0),
        ("typical_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.2),
        ("frequency_penalty", float("nan")),
        ("frequency_penalty", float("-inf")),
        ("seed", -1),
        ("seed", 2**64),
        ("top_n_tokens", -1),
    ],
)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_boundary_params_are_valid():
    params = SamplingParams(do_sample=True, top_p=1.0, typical_p=1.0, seed=2**64 - 1, temperature=1e-3)
    out = Sampler()(torch.randn(1, VOCAB), [params], [SequenceSamplingState(params, [])])
    assert 0 <= int(out.token_ids[0]) < VOCAB
