"""Adapters loaded at runtime, on first request, against the fake workers (which enforce the slot and
generation rules of proto/generate.proto): one load for concurrent first requests, mixed batches, LRU
eviction under a few slots, waiting instead of failing, failed loads remembered, capacity, sources."""

from __future__ import annotations

import asyncio
import random

import pytest

from router import adapter_registry
from tests.router.conftest import ADAPTER_IDS, SCRIPTS, root_text


def metric(h, name: str, **labels) -> float:
    return h.state.metrics.registry.get_sample_value(name, labels) or 0.0


def loads(h, adapter_id: str | None = None, rank: int = 0) -> list:
    return [r for r in h.fakes[rank].requests("LoadAdapter") if adapter_id in (None, r.adapter_id)]


async def text(h, adapter_id: str | None, **parameters) -> tuple[int, str]:
    resp = await h.generate("Hi", max_new_tokens=32, adapter_id=adapter_id, **parameters)
    body = await resp.json()
    return resp.status, body.get("generated_text", body.get("error"))


def no_refs(h) -> bool:
    return all(e.refs == 0 for e in h.state.adapters.entries())


async def test_first_request_loads_once_for_concurrent_requests(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.load_delay = 0.05
    results = await asyncio.gather(*(text(h, "lora-03") for _ in range(8)))
    assert results == [(200, root_text("lora-03"))] * 8
    for rank in (0, 1):
        (load,) = loads(h, "lora-03", rank)
        assert load.path.endswith("/lora-03") and load.generation > 0 and load.slot == 3
    assert metric(h, "multilora_adapter_loads_total", source="root", result="ok") == 1
    assert metric(h, "multilora_adapter_hits_total", tier="disk") == 8
    # Resident now: a hit on the device, no new load, the rows carry its slot and generation.
    assert await text(h, "lora-03") == (200, root_text("lora-03"))
    assert metric(h, "multilora_adapter_hits_total", tier="device") == 1
    assert len(loads(h, "lora-03")) == 1
    rows = [s for r in h.fakes[0].requests("Prefill") for s in r.sequences]
    assert {(s.lora_slot, s.adapter_generation) for s in rows} == {(3, load.generation)}
    await h.settle()
    assert no_refs(h)


async def test_mixed_batch_of_startup_runtime_and_base_adapters(start_router):
    h = await start_router(world_size=2, fake={"num_adapter_slots": 6})
    h.fakes[0].step_delay = h.fakes[1].step_delay = 0.005
    ids = [None, *ADAPTER_IDS, "lora-00", "org/lora-x", "lora-01"] * 3
    results = await asyncio.gather(*(text(h, a) for a in ids))
    expected = {None: SCRIPTS[0], ADAPTER_IDS[0]: SCRIPTS[1], ADAPTER_IDS[1]: SCRIPTS[2]}
    assert results == [(200, expected.get(a) or root_text(a)) for a in ids]
    # They shared steps: some Decode ran rows of several adapters at once.
    assert any(len(r.request_ids) > 1 for r in h.fakes[0].requests("Decode"))
    assert h.fakes[0].mismatches == []


async def test_eviction_under_three_slots_with_sixteen_adapters(start_router):
    h = await start_router(world_size=2, adapters=(), fake={"num_adapter_slots": 3, "num_blocks": 256})
    for f in h.fakes:
        f.step_delay, f.load_delay = 0.002, 0.01
    registry, scheduler = h.state.adapters, h.state.scheduler
    emptied, waited = [], []
    empty = registry._loader.empty

    async def checked_empty(slot: int, generation: int, keep: bool = False) -> bool:
        """No queued or running sequence may name what is being unloaded."""
        in_use = {
            (s.params.lora_slot, s.params.adapter_generation) for s in (*scheduler.queue, *scheduler.running)
        }
        emptied.append((slot, generation, (slot, generation) in in_use))
        return await empty(slot, generation, keep)

    registry._loader.empty = checked_empty
    names = [f"lora-{i:02d}" for i in range(16)]
    rng = random.Random(7)
    ids = [rng.choice(names) for _ in range(96)]

    async def sample_waiting():
        while True:
            waited.append(registry.waiting)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample_waiting())
    try:
        results = await asyncio.gather(*(text(h, a) for a in ids))
    finally:
        sampler.cancel()
    # Every request was served with its own adapter's weights: the text is its adapter's, and the fake
    # refused no row whose generation was not its slot's.
    assert results == [(200, root_text(a)) for a in ids]
    assert h.fakes[0].mismatches == h.fakes[1].mismatches == []
    assert emptied and not any(in_use for *_, in_use in emptied)
    assert metric(h, "multilora_adapter_evictions_total") == len(emptied) >= 13
    assert max(waited) > 0  # requests waited for slots rather than failing
    # Each load went into a slot the previous generation had left, with a generation never used before.
    generations = [r.generation for r in h.fakes[0].requests("LoadAdapter")]
    assert len(set(generations)) == len(generations)
    await h.settle()
    assert no_refs(h) and registry.waiting == 0
    for name in [e.name for e in registry.entries()]:
        await registry.unload(name)
    assert registry.slots.used == 0
    assert h.fakes[0].slots == h.fakes[1].slots == {}


async def test_lru_evicts_the_least_recently_used_and_never_the_pinned(start_router):
    h = await start_router(world_size=1, adapters=ADAPTER_IDS[:1], fake={"num_adapter_slots": 3})
    for a in ("lora-00", "lora-01", "lora-00"):
        assert (await text(h, a))[0] == 200
    assert (await text(h, "lora-02"))[0] == 200  # lora-01 was used least recently; the pinned one stays
    assert h.fakes[0].adapters == {1: ADAPTER_IDS[0], 2: "lora-00", 3: "lora-02"}
    (unload,) = h.fakes[0].requests("UnloadAdapter")
    assert unload.slot == 3 and unload.generation == loads(h, "lora-01")[0].generation
    # Evicted but registered: its next request loads it again, with a new generation.
    assert await text(h, "lora-01") == (200, root_text("lora-01"))
    reload = loads(h, "lora-01")[-1]
    assert reload.slot == 2 and reload.generation > unload.generation


async def test_requests_wait_for_a_slot_held_by_running_requests(start_router):
    h = await start_router(world_size=1, adapters=(), fake={"num_adapter_slots": 1})
    h.fakes[0].step_delay = 0.01
    first = asyncio.create_task(text(h, "lora-00"))
    while not h.state.scheduler.running:
        await asyncio.sleep(0.001)
    second = asyncio.create_task(text(h, "lora-01"))
    await asyncio.sleep(0.05)
    assert not second.done() and h.state.adapters.waiting == 1
    assert metric(h, "multilora_adapter_load_waiting") == 1
    assert await first == (200, root_text("lora-00"))
    assert await second == (200, root_text("lora-01"))
    await h.settle()
    calls = [m for m, r in h.fakes[0].calls if m in ("Release", "UnloadAdapter", "LoadAdapter")]
    assert calls == ["LoadAdapter", "Release", "UnloadAdapter", "LoadAdapter", "Release"]


async def test_failed_load_answers_all_waiters_and_is_remembered(start_router, monkeypatch):
    h = await start_router(world_size=2, fake={"num_adapter_slots": 4})
    h.fakes[1].failing_adapters.add("lora-05")  # rank 0 loads it, rank 1 refuses: all or nothing
    for f in h.fakes:
        f.load_delay, f.step_delay = 0.05, 0.005
    bad = [text(h, "lora-05") for _ in range(5)]
    good = [text(h, a) for a in (None, "adapter-two", "lora-06")]
    results = await asyncio.gather(*bad, *good)
    for status, message in results[:5]:
        assert status == 422
        assert "lora-05" in message and "could not be loaded" in message
        assert "rank 1" in message and "adapter_config.json not found" in message
    assert results[5:] == [(200, SCRIPTS[0]), (200, SCRIPTS[2]), (200, root_text("lora-06"))]
    assert [len(loads(h, "lora-05", rank)) for rank in (0, 1)] == [1, 1]
    # Rolled back on the rank that loaded it; the slot is free for the next adapter.
    (rollback,) = h.fakes[0].requests("UnloadAdapter")
    assert rollback.generation == loads(h, "lora-05")[0].generation
    assert h.fakes[1].requests("UnloadAdapter") == []
    assert "lora-05" not in h.fakes[0].adapters.values()
    assert metric(h, "multilora_adapter_loads_total", source="root", result="failed") == 1
    # Remembered: the same answer without calling the workers again.
    status, message = await text(h, "lora-05")
    assert status == 422 and "adapter_config.json not found" in message
    assert len(loads(h, "lora-05")) == 1
    # Once forgotten, a request tries again.
    monkeypatch.setattr(adapter_registry, "FAILURE_MEMORY_S", 0.0)
    h.state.adapters._failures.clear()
    h.fakes[1].failing_adapters.clear()
    assert await text(h, "lora-05") == (200, root_text("lora-05"))
    assert await text(h, "lora-07") == (200, root_text("lora-07"))
    assert h.fakes[0].mismatches == []


async def test_not_found_names_where_it_looked_and_how_to_allow_downloads(start_router):
    h = await start_router(world_size=1)
    status, message = await text(h, "org/not-here")
    assert status == 422
    assert message.startswith("Input validation error: adapter `org/not-here` is not loaded: ")
    assert "the Hugging Face cache" in message and str(h.config.adapter_roots[0]) in message
    assert "download disabled: set ADAPTER_DOWNLOAD=true to allow it" in message
    assert loads(h, "org/not-here") == []
    assert metric(h, "tgi_request_failure_total", err="validation", adapter="") == 1


async def test_adapter_source_narrows_the_search(start_router):
    h = await start_router(world_size=1)
    status, message = await text(h, "lora-01", adapter_source="hub")
    assert status == 422 and "not found" in message and "adapter roots" not in message
    status, message = await text(h, "lora-02", adapter_source="s3")
    assert status == 422 and "unknown adapter_source 's3'" in message
    assert await text(h, "lora-01", adapter_source="local") == (200, root_text("lora-01"))
    # A registered name is used whatever the source says (lorax sends one with every request).
    assert await text(h, "lora-01", adapter_source="s3") == (200, root_text("lora-01"))
    assert await text(h, "adapter-two", adapter_source="hub") == (200, SCRIPTS[2])


@pytest.mark.parametrize("num_slots", [0, 2])
async def test_no_slot_can_be_freed_fails_at_once(start_router, num_slots):
    h = await start_router(
        world_size=1, adapters=ADAPTER_IDS[:num_slots], fake={"num_adapter_slots": num_slots}
    )
    resp = await h.generate("Hi", max_new_tokens=2, adapter_id="lora-01")
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "adapter_capacity"
    assert "'lora-01'" in body["error"] and "raise MAX_LORA_ADAPTERS" in body["error"]
    assert loads(h, "lora-01") == []
    assert (await h.generate("Hi", max_new_tokens=2)).status == 200


async def test_a_bad_body_loads_nothing_and_a_failed_validation_releases_the_lease(start_router):
    h = await start_router(world_size=1)
    resp = await h.generate("Hi", max_new_tokens=0, adapter_id="lora-09")
    assert resp.status == 422 and "max_new_tokens" in (await resp.json())["error"]
    assert loads(h, "lora-09") == []
    # OpenAI routes resolve `model` first: the adapter loads, and the lease is released on the 422.
    resp = await h.http.post("/v1/completions", json={"model": "lora-09", "prompt": "Hi", "n": 2})
    assert resp.status == 422
    assert len(loads(h, "lora-09")) == 1 and no_refs(h)


async def test_a_request_that_goes_away_while_its_adapter_loads(start_router):
    h = await start_router(world_size=1)
    registry = h.state.adapters
    gate = h.fakes[0].load_gate = asyncio.Event()
    waiting = asyncio.create_task(registry.acquire("lora-11"))
    while registry.waiting == 0:
        await asyncio.sleep(0.001)
    waiting.cancel()
    await asyncio.sleep(0.01)
    assert registry.waiting == 0 and no_refs(h)
    gate.set()
    (entry,) = [e for e in registry.entries() if e.name == "lora-11"]
    while entry.state != "resident":  # the load goes on for the requests to come
        await asyncio.sleep(0.001)
    assert entry.refs == 0
    assert await text(h, "lora-11") == (200, root_text("lora-11"))
    assert len(loads(h, "lora-11")) == 1


async def test_a_rank_failing_a_load_is_rolled_back_everywhere(start_router):
    h = await start_router(world_size=2)
    h.fakes[1].fail_next["LoadAdapter"] = "rank 1: adapter 'lora-12': OSError: disk gone"  # INTERNAL
    resp = await h.generate("Hi", max_new_tokens=2, adapter_id="lora-12")
    body = await resp.json()
    assert resp.status == 424 and body["error_type"] == "generation"
    assert "'lora-12' could not be loaded" in body["error"] and "disk gone" in body["error"]
    # Rank 1's outcome is not known from an INTERNAL error: both ranks are told to unload; rank 1, whose
    # slot never held it, refuses, which in a rollback means there is nothing to undo.
    generation = loads(h, "lora-12")[0].generation
    for fake in h.fakes:
        assert [(r.slot, r.generation) for r in fake.requests("UnloadAdapter")] == [(3, generation)]
        assert 3 not in fake.slots
    assert h.state.adapters.slots.used == 2
    h.state.adapters._failures.clear()
    assert await text(h, "lora-12") == (200, root_text("lora-12"))
    assert loads(h, "lora-12")[-1].slot == 3


async def test_a_slow_load_stalls_no_other_request(start_router):
    h = await start_router(world_size=2)
    gate = asyncio.Event()
    for f in h.fakes:
        f.load_gate = gate
    cold = asyncio.create_task(text(h, "lora-13"))
    while h.state.adapters.waiting == 0:
        await asyncio.sleep(0.001)
    assert await text(h, None) == (200, SCRIPTS[0])
    assert await text(h, "adapter-two") == (200, SCRIPTS[2])
    assert not cold.done() and metric(h, "multilora_adapter_load_waiting") == 1
    gate.set()
    assert await cold == (200, root_text("lora-13"))
