"""Load: 1000 requests at concurrency 64 against a launcher allowing 16 concurrent requests.

Every request must end within its timeout with 200 (a complete response: JSON, or a stream whose last
event carries `generated_text`) or 429, never a 5xx or another error; afterwards no KV block and no
adapter slot is held. A client answered 429 waits `BACKOFF_S` before its next request, as a polite client
would, so that the run is not only a storm of 429s. Prints the figures (run with `-s` to see them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time

import aiohttp
import pytest

from tests.reliability.conftest import API_KEY, MAX_CONCURRENT_REQUESTS
from tests.reliability.scrape import IDLE_GAUGES, metric, settled

pytestmark = pytest.mark.slow

REQUESTS = 1000
CONCURRENCY = 64
TIMEOUT_S = 120.0
BACKOFF_S = 0.05
PROMPTS = ("Hello who are you?", "The capital of France is", "def f(x):", "Once upon a time")
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def plan(adapters: list[str | None]) -> list[tuple[str, dict, bool]]:
    """(path, body, stream) per request: every adapter and prompt, 1-4 new tokens, one in four streamed."""
    out = []
    cases = itertools.product(range(4), adapters, PROMPTS)
    for i, (tokens, adapter, prompt) in zip(range(REQUESTS), itertools.cycle(cases), strict=False):
        params: dict = {"max_new_tokens": tokens + 1, "details": True}
        if adapter is not None:
            params["adapter_id"] = adapter
        stream = i % 4 == 3
        out.append(
            ("/generate_stream" if stream else "/generate", {"inputs": prompt, "parameters": params}, stream)
        )
    return out


async def one(session: aiohttp.ClientSession, url: str, path: str, body: dict, stream: bool):
    """(status, latency_s, problem or None) of one request."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(TIMEOUT_S), session.post(url + path, json=body, headers=HEADERS) as resp:
            raw = await resp.read()
            status = resp.status
    except TimeoutError:
        return None, time.monotonic() - start, "timed out"
    latency = time.monotonic() - start
    if status != 200:
        return status, latency, None if status == 429 else raw.decode(errors="replace")
    if not stream:
        ok = "generated_text" in json.loads(raw)
        return status, latency, None if ok else raw.decode()
    events = [json.loads(line[5:]) for line in raw.decode().split("\n") if line.startswith("data:")]
    ok = bool(events) and events[-1].get("generated_text") is not None and "error" not in events[-1]
    return status, latency, None if ok else raw.decode()


async def drive(url: str, requests: list[tuple[str, dict, bool]]) -> list[tuple]:
    todo = iter(requests)
    results: list[tuple] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for path, body, stream in todo:
                results.append(await one(session, url, path, body, stream))
                if results[-1][0] == 429:
                    await asyncio.sleep(BACKOFF_S)

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return results


def test_load_gets_200_or_429_and_frees_everything(served, e2e_adapters):
    requests = plan([None, *e2e_adapters])
    start = time.monotonic()
    results = asyncio.run(drive(served.url, requests))
    wall = time.monotonic() - start
    text = asyncio.run(settled(served.url))

    statuses = [status for status, _, _ in results]
    problems = [(status, problem) for status, _, problem in results if problem is not None]
    ok = sorted(latency for status, latency, _ in results if status == 200)
    counts = {s: statuses.count(s) for s in set(statuses)}
    p50, p99 = statistics.quantiles(ok, n=100)[49], statistics.quantiles(ok, n=100)[98]
    print(
        f"\nload: {len(results)} requests at concurrency {CONCURRENCY} "
        f"(max_concurrent_requests {MAX_CONCURRENT_REQUESTS}) in {wall:.1f} s: "
        f"200 x {counts.get(200, 0)}, 429 x {counts.get(429, 0)}; "
        f"latency of 200s p50 {p50:.3f} s, p99 {p99:.3f} s"
    )
    assert len(results) == REQUESTS
    assert not problems, problems[:5]
    assert set(counts) <= {200, 429}, counts
    assert counts.get(200, 0) >= MAX_CONCURRENT_REQUESTS and counts.get(429, 0) > 0, counts
    assert {n: metric(text, n) for n in IDLE_GAUGES} == dict.fromkeys(IDLE_GAUGES, 0)
    assert metric(text, "multilora_adapter_slots_used") == len(e2e_adapters)  # loaded, not in use
