"""Reading a running launcher from outside: samples of its /metrics, and its public gRPC port."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp

from tests.e2e.harness import Server

# Gauges that are 0 whenever no request is queued or running.
IDLE_GAUGES = (
    "tgi_queue_size",
    "tgi_batch_current_size",
    "multilora_kv_blocks_used",
    "multilora_adapter_slots_active",
)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as resp:
        return await resp.text()


async def settled(url: str, timeout_s: float = 15.0) -> str:
    """/metrics once every IDLE_GAUGES is 0, or after `timeout_s` (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            text = await scrape(session, url)
            if all(metric(text, n) == 0 for n in IDLE_GAUGES) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.1)


async def until_running(session: aiohttp.ClientSession, url: str, n: int, timeout_s: float = 60.0) -> None:
    """Until at least `n` sequences are in the running batch."""
    async with asyncio.timeout(timeout_s):
        while metric(await scrape(session, url), "tgi_batch_current_size") < n:
            await asyncio.sleep(0.02)


def grpc_port(server: Server) -> int:
    """The public gRPC API's port, from the router's log line."""
    match = re.search(r"Public gRPC API listening on \S+:(\d+)", server.log())
    assert match, server.log()
    return int(match.group(1))
