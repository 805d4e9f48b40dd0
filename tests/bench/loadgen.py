"""HTTP load generator: streaming `/generate_stream` requests at a fixed concurrency or Poisson arrivals.

Each request records when it was sent, when each token event arrived and how it finished, so TTFT
(send to first token event) and inter-token latency (gaps between token events of one request) come
from the client's side of a real HTTP connection. Requests are greedy; the API has no way to ignore
EOS, so a request may stop before its max_new_tokens: the tokens actually streamed are what is counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from tests.bench.workload import Request

TIMEOUT = aiohttp.ClientTimeout(total=1800, sock_read=600)


@dataclass
class Record:
    request: Request
    sent: float = 0.0  # perf_counter at send
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token event
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass
class Run:
    records: list[Record]
    wall_s: float  # first send to last response


def _body(r: Request) -> dict:
    params: dict = {"max_new_tokens": r.max_new_tokens, "details": True, "stop": []}
    if r.adapter is not None:
        params["adapter_id"] = r.adapter
    return {"inputs": r.text, "parameters": params}


async def _one(session: aiohttp.ClientSession, url: str, rec: Record) -> None:
    rec.sent = time.perf_counter()
    try:
        async with session.post(url + "/generate_stream", json=_body(rec.request)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    rec.error = str(event["error"])
                    return
                if event.get("token") is not None:
                    rec.token_times.append(time.perf_counter())
                if event.get("details"):
                    rec.finish_reason = event["details"]["finish_reason"]
                elif event.get("generated_text") is not None:
                    rec.finish_reason = "unknown"
    except (TimeoutError, aiohttp.ClientError, ValueError) as err:
        rec.error = repr(err)


async def closed_loop(
    url: str, requests: list[Request], concurrency: int, stop: asyncio.Event | None = None
) -> Run:
    """`run_concurrency` inside a running event loop. Once `stop` is set no new request is sent (those in
    flight finish); the Run holds the requests sent."""
    records = [Record(r) for r in requests]
    queue = iter(records)
    sent: list[Record] = []

    async def worker(session):
        for rec in queue:
            if stop is not None and stop.is_set():
                return
            sent.append(rec)
            await _one(session, url, rec)

    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(min(concurrency, len(records)))))
        return Run(sorted(sent, key=lambda r: r.request.index), time.perf_counter() - start)


async def _poisson(url: str, requests: list[Request], offsets: list[float]) -> Run:
    records = [Record(r) for r in requests]

    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()

        async def delayed(rec: Record, at: float):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            await _one(s, url, rec)

        await asyncio.gather(*(delayed(rec, at) for rec, at in zip(records, offsets, strict=True)))
        return Run(records, time.perf_counter() - start)


def run_concurrency(url: str, requests: list[Request], concurrency: int) -> Run:
    """Keep `concurrency` requests in flight until all are done (closed loop)."""
    return asyncio.run(closed_loop(url, requests, concurrency))


def run_poisson(url: str, requests: list[Request], offsets: list[float]) -> Run:
    """Send request i at offsets[i] seconds from the start, whatever is in flight (open loop)."""
    return asyncio.run(_poisson(url, requests, offsets))
