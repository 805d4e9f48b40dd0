"""A worker rank that stops answering (SIGSTOP) mid-batch: the step deadline fails its requests with 424
within STEP_TIMEOUT_FLOOR, /health answers 503, and the launcher stops everything and exits 1, as for a
rank that dies (tests/reliability/test_faults.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import pytest

from tests.e2e.harness import Server, get
from tests.reliability.inflight import Outcome, http_generate, sse_generate
from tests.reliability.scrape import until_running

pytestmark = pytest.mark.slow

# The tiny model's steps take milliseconds, so the floor is the whole deadline.
STEP_TIMEOUT_FLOOR_S = 2.0
# Scheduling slack on a loaded machine, past the deadline.
SLACK_S = 3.0


async def stop_worker_mid_batch(server: Server, worker_pid: int) -> tuple[float, list[Outcome]]:
    """A /generate and a /generate_stream request in the running batch, then SIGSTOP the worker."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [
            asyncio.create_task(http_generate(session, server.url, None, 1500)),
            asyncio.create_task(sse_generate(session, server.url, None, 1500)),
        ]
        await until_running(session, server.url, len(tasks))
        await asyncio.sleep(0.2)  # past their prefills, into the decode steps
        os.kill(worker_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=STEP_TIMEOUT_FLOOR_S + SLACK_S)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} requests got no answer within the deadline"
        return stopped, [t.result() for t in tasks]


@pytest.mark.parametrize("launcher_paused", [False, True], ids=["launcher-running", "launcher-paused"])
def test_worker_stopped_mid_batch(launch, e2e_model_dir, launcher_paused):
    """The worker stays stopped: the launcher must kill it. With the launcher paused, the router alone
    fails the requests and answers 503 on /health; once resumed, the launcher gets the router's report."""
    # No adapters: the batch is the base model's, which is all a step deadline needs.
    server = launch(
        e2e_model_dir,
        {},
        STEP_TIMEOUT_FLOOR=str(STEP_TIMEOUT_FLOOR_S),
        GRACEFUL_TERMINATION_TIMEOUT="2",
    )
    server.wait_ready()
    worker_pid = server.child_pids()["worker-0"]
    if launcher_paused:
        server.signal(signal.SIGSTOP)
    code = None
    try:
        stopped, outcomes = asyncio.run(stop_worker_mid_batch(server, worker_pid))
        if launcher_paused:
            status, body = get(server.url + "/health", timeout=10)
            assert status == 503, body
            server.signal(signal.SIGCONT)
        code = server.wait(timeout=60)
    finally:
        # A stopped worker ignores the launcher's SIGTERM: only a SIGKILL (the launcher's, or this one
        # when the test failed) ends it.
        if code is None:
            server.signal(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)
    log = server.log()
    assert code == 1, log
    assert "no answer within the step's" in log, log
    assert "the router reports a hung worker rank" in log and "multilora stopped: a worker rank hung" in log
    assert "worker-0 did not stop within 2 s: killing it" in log, log
    for out in outcomes:
        assert out.error is not None and "deadline" in out.error, out
        assert out.kind != "http" or out.status == 424, out
        assert out.done - stopped < STEP_TIMEOUT_FLOOR_S + SLACK_S, out
