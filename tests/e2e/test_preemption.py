"""Preemption end to end: with a KV cache of 6 blocks, 8 concurrent requests cannot all keep their
blocks, so the newest are preempted and recomputed; each one's tokens (greedy, and sampled with a seed
and a repetition penalty) and a stream's must equal that request's on an uncontended server (float32,
the tiny model, no adapters)."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.harness import get, running
from tests.e2e.test_serving import tiny_env

pytestmark = pytest.mark.slow

# The tiny model's KV block: K and V x 3 layers x 16 tokens x 4 KV heads x head dim 8 x 4 bytes.
BLOCK_BYTES = 2 * 3 * 16 * 4 * 8 * 4
NUM_BLOCKS = 6  # 96 tokens; one request needs up to 3 blocks, 8 at once up to 24
NEW_TOKENS = 40
PROMPTS = ["Hello who are you?", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
SAMPLED = {"do_sample": True, "temperature": 1.3, "top_k": 50, "seed": 7, "repetition_penalty": 1.2}
CASES = [(prompt, sampling) for prompt in PROMPTS for sampling in ("greedy", "sampled")]


def _params(sampling: str) -> dict:
    return {"max_new_tokens": NEW_TOKENS, "details": True, **(SAMPLED if sampling == "sampled" else {})}


def _token_ids(server, prompt: str, sampling: str) -> list[int]:
    status, body = server.generate(prompt, **_params(sampling))
    assert status == 200, body
    return [t["id"] for t in body["details"]["tokens"]]


def _streamed_ids(server, prompt: str, sampling: str) -> list[int]:
    body = json.dumps({"inputs": prompt, "parameters": _params(sampling)}).encode()
    request = urllib.request.Request(
        server.url + "/generate_stream", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        raw = resp.read()
    events = [json.loads(e.removeprefix(b"data:")) for e in raw.strip().split(b"\n\n")]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))  # none repeated or skipped
    return [e["token"]["id"] for e in events]


def _preemptions(server) -> float:
    status, text = get(server.url + "/metrics")
    assert status == 200
    return sum(float(v) for v in re.findall(rb"^multilora_preemptions\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def server(e2e_model_dir, tmp_path_factory):
    env = tiny_env(e2e_model_dir, {}, KV_CACHE_MEMORY=str(NUM_BLOCKS * BLOCK_BYTES))
    with running(tmp_path_factory.mktemp("preemption") / "launcher.log", env) as server:
        yield server


def test_preempted_requests_equal_their_uncontended_outputs(server):
    solo = {case: _token_ids(server, *case) for case in CASES}
    assert _preemptions(server) == 0  # one at a time, each fits
    assert all(len(ids) == NEW_TOKENS for ids in solo.values())
    with ThreadPoolExecutor(len(CASES) + 1) as pool:
        together = {case: pool.submit(_token_ids, server, *case) for case in CASES}
        streamed = pool.submit(_streamed_ids, server, *CASES[0])
        together = {case: f.result() for case, f in together.items()}
        streamed = streamed.result()
    assert _preemptions(server) > 0, "the cache was not small enough to preempt anything"
    for case in CASES:
        assert together[case] == solo[case], case
    assert streamed == solo[CASES[0]]
