"""Eviction end to end (issue 15): 16 adapters under a root served through 3 slots, and through an adapter
pool (ADAPTER_MEMORY) that holds about 3 of the largest, on the tiny e2e Llama.

Each adapter's output alone (a server with room for every adapter, one request at a time) is the
expectation; then every request at once, twice, in mixed batches, on the small server: each must give
exactly its solo output (float32 greedy decoding is batch-invariant), none may fail for lack of room, and
/metrics must count the evictions. A row served with the weights of an adapter that had its slot or its
pool rows before, or after, would differ (and the rows freed are NaN: reading one would show).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.adapter_factory import ALL_TARGETS, reseed_adapter, save_random_adapter
from tests.e2e.harness import Server, get, running

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 16
SLOTS = 3
PROMPTS = ["Hello who are you?", "Once upon a time"]
NEW_TOKENS = 8
# (LoRA rank, target modules) of the templates; adapter i is template i % 3 with its own random weights.
# Each writes to the residual stream (o_proj or down_proj): on this random model q, k, gate and up alone
# hardly change a greedy output.
TEMPLATES = ((4, ("q_proj", "v_proj", "o_proj")), (8, ("o_proj", "down_proj")), (16, ALL_TARGETS))


@pytest.fixture(scope="module")
def adapter_root(e2e_model_dir, tmp_path_factory):
    templates = tmp_path_factory.mktemp("eviction-templates")
    made = [
        save_random_adapter(e2e_model_dir, templates / f"r{r}", r=r, alpha=16, target_modules=targets)
        for r, targets in TEMPLATES
    ]
    root = tmp_path_factory.mktemp("eviction-root")
    for i in range(NUM_ADAPTERS):
        reseed_adapter(made[i % len(made)], root / f"ad{i:02d}", seed=100 + i)
    return root


CASES = [(prompt, f"ad{i:02d}") for i in range(NUM_ADAPTERS) for prompt in PROMPTS]


def env(e2e_model_dir, adapter_root, slots: int, **more: str) -> dict[str, str]:
    return {
        **more,
        "MODEL_ID": str(e2e_model_dir),
        "DTYPE": "float32",
        "DEVICE": os.environ.get("MULTILORA_E2E_DEVICE", "cpu"),
        "LORA_ADAPTER_ROOTS": str(adapter_root),
        "MAX_LORA_ADAPTERS": str(slots),
        "KV_CACHE_MEMORY": "64MiB",
    }


def token_ids(server: Server, prompt: str, adapter: str) -> list[int]:
    status, body = server.generate(prompt, max_new_tokens=NEW_TOKENS, details=True, adapter_id=adapter)
    assert status == 200, (adapter, body)
    return [t["id"] for t in body["details"]["tokens"]]


@pytest.fixture(scope="module")
def solo(e2e_model_dir, adapter_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("solo") / "launcher.log"
    with running(log_path, env(e2e_model_dir, adapter_root, NUM_ADAPTERS)) as server:
        return {case: token_ids(server, *case) for case in CASES}


def samples(server: Server) -> list[tuple[str, float]]:
    """(series with labels, value) of /metrics."""
    status, raw = get(server.url + "/metrics")
    assert status == 200
    lines = [line.rsplit(" ", 1) for line in raw.decode().splitlines() if line and not line.startswith("#")]
    return [(series, float(value)) for series, value in lines]


def evictions(server: Server) -> float:
    values = [(series.split("{")[0], value) for series, value in samples(server)]
    counted = [value for name, value in values if "evict" in name and not name.endswith("_created")]
    assert counted, "no eviction metric in /metrics"
    return sum(counted)


def run_waves(server: Server, solo) -> None:
    # Two waves, the second in reverse order: it reloads the adapters the first one evicted.
    for wave in (CASES * 2, CASES[::-1] * 2):
        with ThreadPoolExecutor(len(wave)) as pool:
            outputs = list(pool.map(lambda case: token_ids(server, *case), wave))
        for case, tokens in zip(wave, outputs, strict=True):
            assert tokens == solo[case], case


def test_sixteen_adapters_through_three_slots_equal_their_solo_outputs(
    e2e_model_dir, adapter_root, solo, tmp_path
):
    per_adapter = {adapter: tuple(tuple(solo[p, adapter]) for p in PROMPTS) for _, adapter in CASES}
    assert len(set(per_adapter.values())) == NUM_ADAPTERS, f"adapters must differ: {per_adapter}"
    with running(tmp_path / "launcher.log", env(e2e_model_dir, adapter_root, SLOTS)) as server:
        run_waves(server, solo)
        # Each wave loads at least NUM_ADAPTERS - SLOTS adapters that are not resident, into full slots.
        assert evictions(server) >= 2 * (NUM_ADAPTERS - SLOTS)


def test_sixteen_adapters_through_a_small_adapter_memory_equal_their_solo_outputs(
    e2e_model_dir, adapter_root, solo, tmp_path
):
    """Slots for all, but a pool of about 3 of the largest adapters (their float32 files are their true
    size, plus a header): loads that do not fit evict; evicted weights come back from the host tier."""
    largest = max(
        (adapter_root / d / "adapter_model.safetensors").stat().st_size for d in os.listdir(adapter_root)
    )
    more = {"ADAPTER_MEMORY": str(3 * largest)}
    with running(tmp_path / "launcher.log", env(e2e_model_dir, adapter_root, NUM_ADAPTERS, **more)) as server:
        run_waves(server, solo)
        assert evictions(server) >= NUM_ADAPTERS
        values = dict(samples(server))
        assert values['multilora_adapter_hits{tier="host"}'] > 0
        assert (
            values['multilora_adapter_bytes_used{tier="device"}']
            <= values['multilora_adapter_bytes_total{tier="device"}']
        )
