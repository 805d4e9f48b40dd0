"""Chunked prefill end to end: with MAX_BATCH_PREFILL_TOKENS=16, prompts several times that long are
prefilled in chunks, joining steps where other requests decode; each one's tokens, token logprobs and
prompt logprobs (greedy, and sampled with a seed and a repetition penalty; with and without an adapter)
equal a server's whose budget takes them whole (float32, the tiny model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.harness import running
from tests.e2e.test_serving import tiny_env

pytestmark = pytest.mark.slow

BUDGET = 16
NEW_TOKENS = 12
LONG = " ".join(f"item {i} is a {'red' if i % 2 else 'blue'} box;" for i in range(12))  # ~90 tokens
SAMPLED = {"do_sample": True, "temperature": 1.3, "top_k": 50, "seed": 7, "repetition_penalty": 1.2}
CASES = [(s, a) for s in ("greedy", "sampled") for a in (None, "b_r8")]


def _run(server, sampling: str, adapter: str | None, prompt: str = LONG) -> dict:
    params = {"max_new_tokens": NEW_TOKENS, "decoder_input_details": True}
    params |= SAMPLED if sampling == "sampled" else {}
    if adapter is not None:
        params["adapter_id"] = adapter
    status, body = server.generate(prompt, **params)
    assert status == 200, body
    return body["details"]


@pytest.fixture(scope="module")
def servers(e2e_model_dir, e2e_adapters, tmp_path_factory):
    logs = tmp_path_factory.mktemp("chunked")
    chunked = tiny_env(e2e_model_dir, e2e_adapters, MAX_BATCH_PREFILL_TOKENS=str(BUDGET))
    whole = tiny_env(e2e_model_dir, e2e_adapters, MAX_BATCH_PREFILL_TOKENS="4096")
    with running(logs / "chunked.log", chunked) as small, running(logs / "whole.log", whole) as large:
        yield small, large


def _assert_same(got: dict, want: dict) -> None:
    assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
    for key in ("tokens", "prefill"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key], strict=True):
            assert g["id"] == w["id"]
            assert (g["logprob"] is None) == (w["logprob"] is None)
            if w["logprob"] is not None:
                assert abs(g["logprob"] - w["logprob"]) <= 1e-4, (key, g, w)


def test_chunked_prompts_equal_whole_ones(servers):
    small, large = servers
    want = {case: _run(large, *case) for case in CASES}
    assert len(want[CASES[0]]["prefill"]) > 4 * BUDGET, "the prompt is not several budgets long"
    # All at once, with short requests decoding while the long prompts come in chunks.
    with ThreadPoolExecutor(len(CASES) + 2) as pool:
        shorts = [pool.submit(_run, small, "greedy", None, "Hi there") for _ in range(2)]
        got = {case: pool.submit(_run, small, *case) for case in CASES}
        got = {case: f.result() for case, f in got.items()}
        assert all(len(f.result()["tokens"]) == NEW_TOKENS for f in shorts)
    for case in CASES:
        _assert_same(got[case], want[case])
