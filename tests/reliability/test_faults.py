"""Faults: a worker rank SIGKILLed mid-batch, and the launcher's SIGTERM, with requests in flight over
/generate, /generate_stream and the public gRPC API."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.e2e.harness import Server, get
from tests.reliability.inflight import (
    Outcome,
    grpc_generate,
    http_generate,
    sse_generate,
)
from tests.reliability.scrape import grpc_port, until_running

pytestmark = pytest.mark.slow

ERROR_WITHIN_S = 5.0


async def fire(server: Server, adapters: list[str | None], n: int) -> tuple[aiohttp.ClientSession, list]:
    """One request per adapter per API, started; returns once all of them are in the running batch."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
    port = grpc_port(server)
    tasks = []
    for adapter in adapters:
        tasks.append(asyncio.create_task(http_generate(session, server.url, adapter, n)))
        tasks.append(asyncio.create_task(sse_generate(session, server.url, adapter, n)))
        tasks.append(asyncio.create_task(grpc_generate(port, adapter, n)))
    await until_running(session, server.url, len(tasks))
    return session, tasks


async def kill_worker_mid_batch(server: Server, adapters: list[str | None]) -> tuple[float, list[Outcome]]:
    session, tasks = await fire(server, adapters, n=1500)
    try:
        os.kill(server.child_pids()["worker-0"], signal.SIGKILL)
        killed = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=ERROR_WITHIN_S + 1.0)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} requests got no answer within {ERROR_WITHIN_S + 1} s"
        return killed, [t.result() for t in tasks]
    finally:
        await session.close()


@pytest.mark.parametrize("launcher_paused", [False, True], ids=["launcher-running", "launcher-paused"])
def test_worker_killed_mid_batch(launch, e2e_model_dir, e2e_adapters, launcher_paused):
    """Every request in flight gets an error within 5 s, /health says 503, and the launcher exits 1.

    With the launcher paused (SIGSTOP) the router alone must do it: the launcher, once resumed, stops it.
    """
    server = launch(e2e_model_dir, e2e_adapters, GRPC_PORT="0")
    server.wait_ready()
    if launcher_paused:
        server.signal(signal.SIGSTOP)
    try:
        killed, outcomes = asyncio.run(kill_worker_mid_batch(server, [None, *e2e_adapters]))
        if launcher_paused:
            status, body = get(server.url + "/health", timeout=10)
            assert status == 503, body
    finally:
        if launcher_paused:
            server.signal(signal.SIGCONT)
    code = server.wait(timeout=60)
    log = server.log()
    assert code != 0, log
    assert "worker-0 (pid" in log and "was killed by SIGKILL" in log, log
    for out in outcomes:
        assert out.error is not None and out.status not in (None, "OK"), out  # an answer, and an error
        assert out.kind != "http" or out.status == 424, out
        assert out.kind != "grpc" or out.status == "INTERNAL", out
        assert out.done - killed < ERROR_WITHIN_S, out


async def sigterm_in_flight(server: Server, adapters: list[str | None], n: int):
    session, tasks = await fire(server, adapters, n)
    try:
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        return signalled, await asyncio.gather(*tasks)
    finally:
        await session.close()


def test_sigterm_lets_requests_in_flight_finish(launch, e2e_model_dir, e2e_adapters):
    n = 200
    adapters = [None, *e2e_adapters]
    server = launch(e2e_model_dir, e2e_adapters, GRPC_PORT="0")
    server.wait_ready()
    expected = {}
    for adapter in adapters:
        params = {"max_new_tokens": n, "details": True, **({"adapter_id": adapter} if adapter else {})}
        status, body = server.generate("Once upon a time", **params)
        assert status == 200, body
        expected[adapter] = tuple(t["id"] for t in body["details"]["tokens"])
    signalled, outcomes = asyncio.run(sigterm_in_flight(server, adapters, n))
    assert server.wait(timeout=120) == 0, server.log()
    for out in outcomes:
        assert out.error is None and out.status in (200, "OK"), out
        assert out.tokens == expected[out.adapter], out
    assert max(out.done for out in outcomes) > signalled, "nothing was in flight at SIGTERM"
