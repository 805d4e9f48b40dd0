"""The adapter management routes (vLLM's load/unload, GET /v1/adapters) and their public gRPC methods,
unload during generation, /v1/models and /info after runtime loads, and the adapter metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from proto import public_pb2 as pb
from proto.public_pb2_grpc import TextGenerationStub
from router.grpc_service import GRPC_PORT
from tests.router.conftest import ADAPTER_IDS, BASE_MODEL_ID, root_text, write_fake_adapter
from tests.router.test_adapter_loading import loads, metric, text


async def load(h, name: str, path: str, **extra):
    return await h.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **extra})


async def unload(h, name: str):
    return await h.http.post("/v1/unload_lora_adapter", json={"lora_name": name})


async def listed(h) -> dict[str, dict]:
    resp = await h.http.get("/v1/adapters")
    assert resp.status == 200
    return {a["name"]: a for a in (await resp.json())["adapters"]}


async def test_load_route_loads_now_and_the_name_routes(start_router, adapter_root):
    h = await start_router(world_size=2)
    resp = await load(h, "my-lora", "lora-04", load_inplace=False)  # vLLM's extra key is ignored
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert await resp.text() == "Success: LoRA adapter 'my-lora' added successfully."
    for rank in (0, 1):
        (sent,) = loads(h, "my-lora", rank)
        assert sent.path == str(adapter_root / "lora-04")
    assert await text(h, "my-lora") == (200, root_text("my-lora"))
    # An absolute path inside a root works too; `pinned` is shown.
    assert (await load(h, "pinned-one", str(adapter_root / "org" / "lora-x"), pinned=True)).status == 200
    adapters = await listed(h)
    assert list(adapters) == [*ADAPTER_IDS, "my-lora", "pinned-one"]
    mine = adapters["my-lora"]
    disk = sum(f.stat().st_size for f in (adapter_root / "lora-04").iterdir())
    assert mine == {
        "name": "my-lora",
        "source": "route",
        "origin": "lora-04",
        "path": str(adapter_root / "lora-04"),
        "revision": None,
        "rank": 24,
        "alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],
        "bytes": {"device": 3000, "host": 0, "disk": disk},
        "state": "resident",
        "error": None,
        "pinned": False,
        "requests_in_flight": 0,
        "last_used": mine["last_used"],
        "slot": 3,
        "generation": sent.generation,
    }
    assert isinstance(mine["last_used"], float)
    assert adapters["pinned-one"]["pinned"] and adapters[ADAPTER_IDS[0]]["source"] == "startup"
    # /v1/models and /info list it.
    models = [m["id"] for m in (await (await h.http.get("/v1/models")).json())["data"]]
    assert models == [BASE_MODEL_ID, *ADAPTER_IDS, "my-lora", "pinned-one"]
    info = (await (await h.http.get("/info")).json())["adapters"]
    assert [(a["id"], a["source"], a["state"], a["pinned"]) for a in info][2:] == [
        ("my-lora", "lora-04", "resident", False),
        ("pinned-one", str(adapter_root / "org" / "lora-x"), "resident", True),
    ]
    assert metric(h, "multilora_adapter_loads_total", source="route", result="ok") == 2


async def test_load_route_errors(start_router, tmp_path):
    root = tmp_path / "root"
    for name in ("lora-01", "lora-02"):
        write_fake_adapter(root / name)
    outside = write_fake_adapter(tmp_path / "outside")
    (root / "escape").symlink_to(outside)
    h = await start_router(world_size=1, adapter_roots=[str(root)])
    resp = await load(h, "adapter-two", "lora-01")
    assert resp.status == 400
    assert (await resp.json())["error"] == "The lora adapter 'adapter-two' has already been loaded."
    resp = await load(h, BASE_MODEL_ID, "lora-01")
    assert resp.status == 400 and "base model" in (await resp.json())["error"]
    resp = await load(h, "x", "nowhere/here")
    assert resp.status == 404 and "'nowhere/here' not found" in (await resp.json())["error"]
    for bad in (
        "../x",
        "/etc/passwd",
        "lora-01/../../etc",
        str(outside),
        str(root / ".." / "outside"),
        "%2e%2e/outside",
        "escape",
        str(root / "escape"),
        "~/x",
        "",
    ):
        resp = await load(h, "bad", bad)
        body = await resp.json()
        assert resp.status == 400 and body["error_type"] == "validation", (bad, body)
        assert "refused" in body["error"], (bad, body)
    assert loads(h, "bad") == [] and loads(h, "x") == []
    assert "bad" not in await listed(h)
    # A load the workers refuse: 422 naming the adapter and the reason; the name stays free.
    h.fakes[0].failing_adapters.add("broken")
    resp = await load(h, "broken", "lora-02")
    body = await resp.json()
    assert (
        resp.status == 422
        and "'broken'" in body["error"]
        and "adapter_config.json not found" in body["error"]
    )
    assert "broken" not in await listed(h)
    h.fakes[0].failing_adapters.clear()
    assert (await load(h, "broken", "lora-02")).status == 200


async def test_unload_route(start_router):
    h = await start_router(world_size=2)
    resp = await unload(h, "nope")
    assert resp.status == 404
    assert await resp.json() == {
        "error": "The lora adapter 'nope' cannot be found.",
        "error_type": "not_found",
    }
    assert (await load(h, "tmp", "lora-01")).status == 200
    resp = await unload(h, "tmp")
    assert resp.status == 200 and await resp.text() == "Success: LoRA adapter 'tmp' removed successfully."
    # Nothing used it: the slot was emptied on every rank before the answer.
    generation = loads(h, "tmp")[0].generation
    for fake in h.fakes:
        assert [(r.slot, r.generation) for r in fake.requests("UnloadAdapter")] == [(3, generation)]
        assert 3 not in fake.slots
    assert "tmp" not in await listed(h)
    assert (await text(h, "tmp"))[0] == 422
    # A pinned startup adapter can be unloaded too.
    assert (await unload(h, "adapter-two")).status == 200
    assert (await text(h, "adapter-two"))[0] == 422
    assert h.state.adapters.slots.used == 1


async def test_unload_during_generation(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.step_delay = 0.01
    assert (await load(h, "tmp", "lora-06")).status == 200
    running = asyncio.create_task(text(h, "tmp"))
    while not h.state.scheduler.running:
        await asyncio.sleep(0.001)
    resp = await unload(h, "tmp")
    assert resp.status == 200  # at once, while the request still runs
    assert not running.done()
    # Unroutable now: a new request fails, while the first one goes on with the weights it started with.
    status, message = await text(h, "tmp")
    assert status == 422 and "`tmp` is not loaded" in message
    assert (await listed(h))["tmp"]["state"] == "unloading"
    assert await running == (200, root_text("tmp"))
    await h.settle()
    while h.fakes[0].requests("UnloadAdapter") == [] or "tmp" in await listed(h):
        await asyncio.sleep(0.001)
    for fake in h.fakes:
        calls = [m for m, _ in fake.calls if m in ("Release", "UnloadAdapter")]
        assert calls[-2:] == ["Release", "UnloadAdapter"]
        assert 3 not in fake.slots
    assert h.state.adapters.slots.used == 2


async def test_adapter_grpc_methods(start_router, adapter_root):
    h = await start_router(world_size=1, grpc_port=0, api_key="k3y")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{h.http.server.app[GRPC_PORT]}")
    stub, key = TextGenerationStub(channel), (("authorization", "Bearer k3y"),)
    try:
        for call, message in (
            (stub.LoadAdapter, pb.LoadAdapterRequest(lora_name="g", lora_path="lora-08")),
            (stub.UnloadAdapter, pb.UnloadAdapterRequest(lora_name="adapter-two")),
            (stub.ListAdapters, pb.ListAdaptersRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(message)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.LoadAdapter(
            pb.LoadAdapterRequest(lora_name="g", lora_path="lora-08"), metadata=key
        )
        a = reply.adapter
        assert (a.name, a.source, a.path, a.state, a.rank, a.slot) == (
            "g",
            "route",
            str(adapter_root / "lora-08"),
            "resident",
            24,
            3,
        )
        assert not a.HasField("revision") and a.bytes.device == 3000 and a.bytes.disk > 0
        listed = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=key)
        assert [x.name for x in listed.adapters] == [*ADAPTER_IDS, "g"]
        reply = await stub.Generate(
            pb.GenerateRequest(
                inputs="Hi", parameters=pb.GenerateParameters(adapter_id="g", max_new_tokens=32)
            ),
            metadata=key,
        )
        assert reply.generated_text == root_text("g")
        cases = [
            (pb.LoadAdapterRequest(lora_name="g", lora_path="lora-09"), grpc.StatusCode.ALREADY_EXISTS),
            (pb.LoadAdapterRequest(lora_name="h", lora_path="../x"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.LoadAdapterRequest(lora_name="h", lora_path="nowhere"), grpc.StatusCode.NOT_FOUND),
        ]
        for message, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadAdapter(message, metadata=key)
            assert err.value.code() == code, message
        h.fakes[0].failing_adapters.add("h")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadAdapter(pb.LoadAdapterRequest(lora_name="h", lora_path="lora-09"), metadata=key)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'h'" in err.value.details()
        await stub.UnloadAdapter(pb.UnloadAdapterRequest(lora_name="g"), metadata=key)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UnloadAdapter(pb.UnloadAdapterRequest(lora_name="g"), metadata=key)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'g'" in err.value.details()
        # adapter_source travels on the public API too.
        params = pb.GenerateParameters(adapter_id="lora-10", adapter_source="hub", max_new_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(inputs="Hi", parameters=params), metadata=key)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "adapter roots" not in err.value.details()
    finally:
        await channel.close()


async def test_adapter_metrics(start_router):
    h = await start_router(world_size=1, adapters=ADAPTER_IDS[:1], fake={"num_adapter_slots": 2})
    assert metric(h, "multilora_adapter_slots_total") == 2
    assert metric(h, "multilora_adapter_slots_used") == 1
    assert metric(h, "multilora_adapters_loaded") == 1
    assert metric(h, "multilora_adapter_loads_total", source="startup", result="ok") == 1
    assert metric(h, "multilora_adapter_bytes_used", tier="device") == 1000
    for a in ("lora-00", "lora-01", "lora-01", ADAPTER_IDS[0]):
        assert (await text(h, a))[0] == 200
    assert metric(h, "multilora_adapter_loads_total", source="root", result="ok") == 2
    assert metric(h, "multilora_adapter_evictions_total") == 1
    assert metric(h, "multilora_adapter_hits_total", tier="disk") == 2
    assert metric(h, "multilora_adapter_hits_total", tier="device") == 2
    assert metric(h, "multilora_adapter_load_duration_count") == 3
    assert metric(h, "multilora_adapter_slots_used") == 2 and metric(h, "multilora_adapters_loaded") == 2
    assert (
        metric(h, "multilora_adapter_bytes_used", tier="device") == 3000
    )  # slots 1 and 2 (the fake: 1000/slot)
    assert metric(h, "multilora_adapter_bytes_used", tier="host") == 0
    disk = sum(e.disk_bytes for e in h.state.adapters.entries())
    assert disk > 0 and metric(h, "multilora_adapter_bytes_used", tier="disk") == disk
    assert metric(h, "multilora_adapter_load_waiting") == 0
    text_ = await (await h.http.get("/metrics")).text()
    assert "# TYPE multilora_adapter_bytes_total gauge" in text_ and "multilora_adapter_loads{" in text_
