"""The step deadline: the policy (router/step_deadline.py) on its own, and a rank that hangs mid-batch
behind the router (fake workers): its batch fails with 424 within the deadline, every later call fails at
once, /health answers 503 and the hang is reported once."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from router.client import RankHungError, ShardedClient
from router.config import RouterConfig
from router.step_deadline import StepDeadline
from tests.router.conftest import BASE_MODEL_ID, SCRIPTS
from tests.router.fake_worker import serve_fakes

MS = 1_000_000  # ns


# ---- the policy ---------------------------------------------------------------------------------


def test_floor_alone_until_a_step_is_measured():
    deadline = StepDeadline(floor_s=30.0, factor=10.0)
    assert deadline.per_token_s is None
    assert deadline.timeout_s(1) == deadline.timeout_s(100_000) == 30.0


def test_never_below_the_floor():
    deadline = StepDeadline(floor_s=5.0, factor=10.0)
    deadline.observe(num_tokens=10, forward_ns=10 * MS)  # 1 ms per token
    for tokens in (0, 1, 10, 499):
        assert deadline.timeout_s(tokens) == 5.0


def test_grows_with_tokens_past_the_floor():
    deadline = StepDeadline(floor_s=1.0, factor=10.0)
    deadline.observe(num_tokens=100, forward_ns=100 * MS)  # 1 ms per token
    assert deadline.timeout_s(1000) == pytest.approx(10.0)  # 10 x 1000 x 1 ms
    assert deadline.timeout_s(2000) == pytest.approx(20.0)
    assert deadline.timeout_s(2000) > deadline.timeout_s(1000) > deadline.timeout_s(100)


def test_bound_is_the_slowest_recent_step_per_token():
    deadline = StepDeadline(floor_s=0.001, factor=2.0)
    deadline.observe(num_tokens=1, forward_ns=8 * MS)  # a decode step of one sequence: 8 ms per token
    deadline.observe(num_tokens=4000, forward_ns=4000 * MS)  # a long prefill: 1 ms per token
    assert deadline.per_token_s == pytest.approx(0.008)
    assert deadline.timeout_s(100) == pytest.approx(2 * 100 * 0.008)


def test_a_slow_step_is_forgotten_after_the_window():
    deadline = StepDeadline(floor_s=0.001, factor=1.0, window=3)
    deadline.observe(num_tokens=1, forward_ns=50 * MS)
    for _ in range(3):
        deadline.observe(num_tokens=1, forward_ns=2 * MS)
    assert deadline.per_token_s == pytest.approx(0.002)


def test_unmeasured_steps_teach_nothing():
    deadline = StepDeadline(floor_s=1.0, factor=10.0)
    deadline.observe(num_tokens=0, forward_ns=5 * MS)  # an empty step
    deadline.observe(num_tokens=8, forward_ns=0)  # a worker that reports no forward time
    assert deadline.per_token_s is None


@pytest.mark.parametrize(
    ("floor_s", "factor", "window"), [(0.0, 10.0, 64), (-1.0, 10.0, 64), (1.0, 0.5, 64), (1.0, 10.0, 0)]
)
def test_bad_parameters_are_refused(floor_s, factor, window):
    with pytest.raises(ValueError):
        StepDeadline(floor_s, factor, window)


# ---- a rank that hangs behind the router ----------------------------------------------------------

FLOOR_S = 0.5


@pytest.fixture
async def hanging_router(tiny_tokenizer_dir, sock_dir, encode):
    """(http client, fakes, hung reports): two fake ranks, steps with a FLOOR_S deadline."""
    reports: list[RankHungError] = []
    async with contextlib.AsyncExitStack() as stack:
        fakes, paths = await stack.enter_async_context(
            serve_fakes(sock_dir, 2, script={0: encode(SCRIPTS[0])})
        )
        client = ShardedClient(paths, deadline=StepDeadline(FLOOR_S, 10.0), on_hung=reports.append)
        stack.push_async_callback(client.close)
        config = RouterConfig(
            model_id=BASE_MODEL_ID,
            model_dir=str(tiny_tokenizer_dir),
            worker_uds=paths,
            worker_connect_timeout_s=5.0,
        )
        http = TestClient(TestServer(create_app(config, client=client)))
        await http.start_server()
        stack.push_async_callback(http.close)
        yield http, fakes, reports


async def test_hung_rank_fails_its_batch_and_the_server(hanging_router):
    http, fakes, reports = hanging_router
    response = await http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert response.status == 200, await response.text()
    assert (await http.get("/health")).status == 200

    fakes[1].step_delay = 3600.0  # rank 1 stops answering steps; its Health still answers
    started = time.monotonic()
    response = await http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    body = await response.json()
    assert response.status == 424, body
    assert body["error_type"] == "generation"
    assert "deadline" in body["error"] and "hung" in body["error"], body
    assert time.monotonic() - started < FLOOR_S + 2.0

    assert (await http.get("/health")).status == 503
    assert len(reports) == 1 and isinstance(reports[0], RankHungError)

    # Hung for good: the next request fails at once, without reaching the ranks.
    steps_before = len(fakes[0].requests("Prefill"))
    started = time.monotonic()
    async with asyncio.timeout(FLOOR_S):
        response = await http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert response.status == 424
    assert time.monotonic() - started < FLOOR_S
    assert len(fakes[0].requests("Prefill")) == steps_before
    assert len(reports) == 1
