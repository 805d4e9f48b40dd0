"""/health, /info, overload (429), worker errors (424), and startup failures."""

from __future__ import annotations

import asyncio

import pytest

from router.adapters import AdapterLoadError
from router.app import create_app
from router.client import ShardedClient
from router.config import AdapterSource, RouterConfig
from router.limits import ConfigError
from tests.router.conftest import ADAPTER_IDS, BASE_MODEL_ID
from tests.router.fake_worker import serve_fakes


async def test_health_ok_and_unhealthy(start_router):
    h = await start_router(world_size=2)
    resp = await h.http.get("/health")
    assert resp.status == 200 and await resp.read() == b""
    h.fakes[1].healthy = False  # one rank failing is enough
    resp = await h.http.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}


async def test_info_fields_and_adapters(start_router):
    h = await start_router(world_size=2, max_concurrent_requests=7, max_batch_size=3)
    resp = await h.http.get("/info")
    assert resp.status == 200
    info = await resp.json()
    expected = {
        "model_id": BASE_MODEL_ID,
        "model_dtype": "float32",
        "model_device_type": "cpu",
        "max_concurrent_requests": 7,
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_input_tokens": 255,
        "max_total_tokens": 256,
        "max_batch_total_tokens": 256,
        "max_batch_prefill_tokens": 256,
        "max_batch_size": 3,
        "max_client_batch_size": 4,
        "router": "multilora-router",
        "num_shard": 2,
    }
    assert {k: info[k] for k in expected} == expected
    assert isinstance(info["version"], str)
    assert info["adapters"] == [
        {
            "id": aid,
            "source": f"hub:{aid}",
            "rank": 8 * slot,
            "alpha": 16.0,
            "use_rslora": False,
            "target_modules": ["q_proj", "v_proj"],
            "state": "resident",
            "pinned": True,
        }
        for slot, aid in enumerate(ADAPTER_IDS, start=1)
    ]
    loads = [(r.slot, r.adapter_id, r.path) for r in h.fakes[1].requests("LoadAdapter")]
    assert loads == [
        (1, "org/adapter-one", "/adapters/org/adapter-one"),
        (2, "adapter-two", "/adapters/adapter-two"),
    ]


async def test_overloaded_is_429(start_router):
    h = await start_router(world_size=1, max_concurrent_requests=1, fake={})
    h.fakes[0].step_delay = 0.05
    slow = asyncio.create_task(h.generate("Hi", max_new_tokens=5))
    await asyncio.sleep(0.02)
    resp = await h.generate("Hi", max_new_tokens=1)
    assert resp.status == 429
    assert await resp.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    # Even an invalid body is refused with 429 while the permit is taken (TGI takes it before validation).
    resp = await h.http.post("/generate", json={"inputs": ""})
    assert resp.status == 429
    assert (await slow).status == 200
    assert (await h.generate("Hi", max_new_tokens=1)).status == 200


@pytest.mark.parametrize("method", ["Prefill", "Decode"])
async def test_worker_error_is_424_for_that_step_only(start_router, method):
    h = await start_router(world_size=2)
    h.fakes[1].fail_next[method] = "CUDA error: device-side assert triggered"
    resp = await h.generate("Hi", max_new_tokens=5)
    assert resp.status == 424
    body = await resp.json()
    assert body["error_type"] == "generation"
    assert body["error"].startswith("Request failed during generation: ")
    assert "rank 1" in body["error"] and "device-side assert" in body["error"]
    await h.settle()
    # The failed sequence was released and the next request works.
    assert (await h.generate("Hi", max_new_tokens=3)).status == 200


async def test_unknown_rank_reply_fails_sequence(start_router):
    """A worker answering without the request's token must not leave the client waiting."""
    h = await start_router(world_size=1)
    h.fakes[0].drop_next.add("Decode")
    resp = await h.generate("Hi", max_new_tokens=3)
    assert resp.status == 424
    assert "no token for request" in (await resp.json())["error"]


# ---- startup ------------------------------------------------------------------------------------


async def _start(sock_dir, tokenizer_dir, *, fake=None, adapters=(), **overrides):
    from aiohttp.test_utils import TestServer

    async with serve_fakes(sock_dir, 2, script={}, **(fake or {})) as (fakes, paths):
        config = RouterConfig(
            model_id=BASE_MODEL_ID,
            model_dir=str(tokenizer_dir),
            worker_uds=paths,
            adapters=[AdapterSource(id=a, source=a, path=f"/p/{a}") for a in adapters],
            worker_connect_timeout_s=2.0,
            **overrides,
        )
        client = ShardedClient(paths)
        server = TestServer(create_app(config, client=client))
        try:
            for f in fakes:
                f.failing_adapters.add("broken")
            await server.start_server()
        finally:
            await server.close()
            await client.close()


async def test_failed_adapter_load_stops_startup_naming_it(sock_dir, tiny_tokenizer_dir):
    with pytest.raises(AdapterLoadError, match="'broken'.*adapter_config.json not found"):
        await _start(sock_dir, tiny_tokenizer_dir, adapters=["good", "broken"])


async def test_more_adapters_than_slots(sock_dir, tiny_tokenizer_dir):
    with pytest.raises(AdapterLoadError, match="3 adapters configured but the workers have 2 adapter slots"):
        await _start(sock_dir, tiny_tokenizer_dir, fake={"num_adapter_slots": 2}, adapters=["a", "b", "c"])


async def test_adapter_named_like_base_model(sock_dir, tiny_tokenizer_dir):
    with pytest.raises(AdapterLoadError, match="cannot be named"):
        await _start(sock_dir, tiny_tokenizer_dir, adapters=[BASE_MODEL_ID])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_total_tokens": 1000}, "exceeds what the workers' KV cache holds"),
        ({"max_total_tokens": 300}, "exceeds max_batch_total_tokens"),
        ({"max_input_tokens": 200, "max_total_tokens": 200}, "must be < max_total_tokens"),
    ],
)
async def test_inconsistent_limits(sock_dir, tiny_tokenizer_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        await _start(sock_dir, tiny_tokenizer_dir, **overrides)


async def test_workers_not_reachable(tiny_tokenizer_dir, sock_dir):
    config = RouterConfig(
        model_id="m",
        model_dir=str(tiny_tokenizer_dir),
        worker_uds=[f"{sock_dir}/none"],
        worker_connect_timeout_s=0.5,
    )
    client = ShardedClient(config.worker_uds)
    with pytest.raises(TimeoutError, match="workers not ready after"):
        await client.wait_ready(config.worker_connect_timeout_s)
    await client.close()


async def test_a_bug_in_token_handling_fails_the_request_not_the_server(start_router, monkeypatch):
    from router.sequence import Sequence

    h = await start_router(world_size=1)
    original = Sequence.on_generation
    monkeypatch.setattr(Sequence, "on_generation", lambda self, gen: 1 / 0)
    resp = await h.generate("Hi", max_new_tokens=3)
    assert resp.status == 424
    assert "internal error" in (await resp.json())["error"]
    monkeypatch.setattr(Sequence, "on_generation", original)
    await h.settle()
    assert (await h.generate("Hi", max_new_tokens=3)).status == 200
