"""Clients that go away mid-generation (a stream closed after a few events, a /generate whose client
gives up) free their batch slots and KV blocks at once; the requests batched with them are unaffected."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.reliability.conftest import API_KEY
from tests.reliability.scrape import IDLE_GAUGES, metric, scrape, settled

pytestmark = pytest.mark.slow

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = 400  # tokens: the survivors are still generating when the others leave
PROMPT = "Once upon a time"


def body(adapter: str | None, max_new_tokens: int = LONG) -> dict:
    params: dict = {"max_new_tokens": max_new_tokens, "details": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    return {"inputs": PROMPT, "parameters": params}


async def stream_tokens(session: aiohttp.ClientSession, url: str, adapter: str | None) -> list[int]:
    """A whole stream's token ids; fails on an error event or a stream without its final event."""
    async with session.post(url + "/generate_stream", json=body(adapter), headers=HEADERS) as resp:
        assert resp.status == 200, await resp.text()
        events = [json.loads(line[5:]) async for line in resp.content if line.startswith(b"data:")]
    assert events and events[-1]["generated_text"] is not None, events[-1:]
    return [e["token"]["id"] for e in events]


async def scenario(url: str, adapters: list[str | None]) -> None:
    async with aiohttp.ClientSession() as session:
        expected = {}
        for adapter in adapters:
            async with session.post(url + "/generate", json=body(adapter), headers=HEADERS) as resp:
                assert resp.status == 200, await resp.text()
                expected[adapter] = [t["id"] for t in (await resp.json())["details"]["tokens"]]

        survivors = [asyncio.create_task(stream_tokens(session, url, a)) for a in adapters]
        # One stream read for a few events, one /generate waiting: both leave mid-generation.
        leaver = await session.post(url + "/generate_stream", json=body(adapters[1]), headers=HEADERS)
        assert leaver.status == 200
        events = 0
        while events < 3:
            line = await leaver.content.readline()
            assert line, "the stream ended early"
            events += line.startswith(b"data:")
        waiter = asyncio.create_task(session.post(url + "/generate", json=body(adapters[2]), headers=HEADERS))
        crowd = len(adapters) + 2
        async with asyncio.timeout(30):
            while metric(text := await scrape(session, url), "tgi_batch_current_size") < crowd:
                await asyncio.sleep(0.02)
        blocks_before = metric(text, "multilora_kv_blocks_used")
        leaver.close()
        waiter.cancel()
        async with asyncio.timeout(10):
            while metric(text := await scrape(session, url), "tgi_batch_current_size") > len(adapters):
                await asyncio.sleep(0.02)
        assert not any(t.done() for t in survivors), "the survivors ended too soon to tell"
        assert metric(text, "multilora_kv_blocks_used") < blocks_before

        results = await asyncio.gather(*survivors)
        for adapter, tokens in zip(adapters, results, strict=True):
            assert tokens == expected[adapter], adapter


def test_disconnected_clients_free_their_slots_and_blocks(served, e2e_adapters):
    start = time.monotonic()
    asyncio.run(scenario(served.url, [None, *e2e_adapters]))
    text = asyncio.run(settled(served.url))
    assert {n: metric(text, n) for n in IDLE_GAUGES} == dict.fromkeys(IDLE_GAUGES, 0)
    assert time.monotonic() - start < 120
