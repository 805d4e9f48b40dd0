"""The adapter memory (the workers' pools and host tiers) against the fake workers: a pool without room
makes the registry evict as many idle adapters as the load needs, evicted weights go to the host tier
(a reload is a copy), an unloaded name's host copy is freed, and pinned adapters alone are a 503.

The fake's adapter in slot s takes 1000 * s bytes; the two LORA_ADAPTERS sit pinned in slots 1 and 2."""

from __future__ import annotations

from tests.router.conftest import root_text
from tests.router.test_adapter_loading import loads, metric, text


def _pool(h, total: int) -> None:
    for f in h.fakes:
        f.pool_bytes = total


def _unloads(h, rank: int = 0) -> list:
    return h.fakes[rank].requests("UnloadAdapter")


async def test_a_full_pool_evicts_what_the_load_needs_and_the_host_tier_keeps_it(start_router):
    h = await start_router(world_size=2)
    _pool(h, 6500)  # the pinned 3000, then one of slot 3 (3000) but not slot 3 and 4 (7000) together
    assert await text(h, "lora-01") == (200, root_text("lora-01"))
    assert await text(h, "lora-02") == (200, root_text("lora-02"))
    # lora-02 was refused a slot-4 load for want of room (both ranks), lora-01 was evicted into the host
    # tier, and lora-02 loaded into the slot that freed.
    assert [(r.slot, r.keep) for r in _unloads(h)] == [(3, True)]
    assert [r.slot for r in loads(h, "lora-02")] == [4, 3]
    assert metric(h, "multilora_adapter_evictions_total") == 1
    (entry,) = [e for e in h.state.adapters.entries() if e.name == "lora-01"]
    assert entry.residency is None and entry.in_host

    # Back again: lora-02 goes the same way, lora-01 comes from the host tier. Its size is known now, so
    # lora-02 (idle once its request settled) is evicted before lora-01's load is sent: no refused load.
    await h.settle()
    assert await text(h, "lora-01") == (200, root_text("lora-01"))
    assert [r.slot for r in loads(h, "lora-01")] == [3, 3]
    assert [(r.slot, r.keep) for r in _unloads(h)] == [(3, True), (3, True)]
    assert metric(h, "multilora_adapter_hits_total", tier="host") == 1
    assert not entry.in_host and entry.residency is not None
    assert metric(h, "multilora_adapter_bytes_used", tier="device") == 2 * 6000  # summed over 2 ranks
    assert metric(h, "multilora_adapter_bytes_total", tier="device") == 2 * 6500

    # Unloading a name whose weights are in the host tier frees them there too.
    resp = await h.http.post("/v1/unload_lora_adapter", json={"lora_name": "lora-02"})
    assert resp.status == 200
    assert [r.adapter_id for r in h.fakes[0].requests("DropHostCopy")] == ["lora-02"]
    for f in h.fakes:
        assert "lora-02" not in f.host_kept
    await h.settle()


async def test_pinned_adapters_alone_filling_the_pool_is_a_503_naming_the_budget(start_router):
    h = await start_router(world_size=1)
    _pool(h, 3000)  # the pinned adapters fill it
    resp = await h.generate("Hi", max_new_tokens=2, adapter_id="lora-01")
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "adapter_capacity"
    assert "'lora-01'" in body["error"] and "raise ADAPTER_MEMORY" in body["error"]
    assert "adapter pool full" in body["error"]
    # The base model and the pinned adapters keep serving.
    assert (await h.generate("Hi", max_new_tokens=2)).status == 200
    assert (await h.generate("Hi", max_new_tokens=2, adapter_id="adapter-two")).status == 200


async def test_a_load_waits_for_pool_room_held_by_running_requests(start_router):
    """The only unpinned resident adapter is in use: the load waits for its requests, then evicts it."""
    import asyncio

    h = await start_router(world_size=1)
    _pool(h, 6500)
    h.fakes[0].step_delay = 0.01
    first = asyncio.create_task(text(h, "lora-01"))
    while not h.fakes[0].requests("Decode"):
        await asyncio.sleep(0.002)
    second = await text(h, "lora-02")
    assert second == (200, root_text("lora-02"))
    assert (await first) == (200, root_text("lora-01"))
    await h.settle()
