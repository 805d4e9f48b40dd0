"""A rank served on TCP (a node other than 0 of a multi-node group) answers only calls with the worker token.

The router's real client (router/client.py) must present it in the format the worker checks.
"""

from __future__ import annotations

import socket
import time

import grpc
import pytest

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from router.client import ShardedClient, WorkerError
from worker import __main__ as worker_main
from worker.auth import TokenInterceptor
from worker.config import WorkerConfig
from worker.runner import ModelRunner
from worker.server import start_tcp_server, stop_server

TOKEN = "0123456789abcdef-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def tcp_rank(tiny_model_dir):
    runner = ModelRunner(WorkerConfig(model_dir=tiny_model_dir, dtype="float32", num_blocks=8))
    address = f"127.0.0.1:{free_port()}"
    server, servicer = await start_tcp_server(runner, address, TOKEN)
    yield address, runner
    await stop_server(server, servicer, grace_s=0)


async def call(address: str, method: str, request, metadata) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await getattr(pb_grpc.TextGenerationServiceStub(channel), method)(
            request, timeout=10, metadata=metadata
        )


async def test_the_token_opens_every_rpc(tcp_rank):
    address, _ = tcp_rank
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    await call(address, "Health", pb.HealthRequest(), metadata)
    await call(address, "Info", pb.InfoRequest(), metadata)


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", TOKEN),),
        (("x-worker-token", TOKEN),),
    ],
    ids=["none", "empty", "short", "long", "no-bearer", "other-key"],
)
@pytest.mark.parametrize("method", ["Health", "Prefill", "ClearCache"])
async def test_a_missing_or_wrong_token_is_refused_before_the_servicer(tcp_rank, metadata, method):
    address, runner = tcp_rank
    request = {
        "Health": pb.HealthRequest(),
        "Prefill": pb.PrefillRequest(
            sequences=[pb.NewSequence(request_id=1, token_ids=[1, 2], block_table=[0])]
        ),
        "ClearCache": pb.ClearCacheRequest(),
    }[method]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(address, method, request, metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "WORKER_TOKEN" in refused.value.details()
    assert runner.sequences == {}


async def test_the_router_client_sends_the_token(tcp_rank):
    address, _ = tcp_rank
    client = ShardedClient([], [address], TOKEN)
    try:
        await client.health(timeout=5)
        assert (await client.info()).vocab_size > 0
    finally:
        await client.close()
    wrong = ShardedClient([], [address], TOKEN + "x")
    try:
        with pytest.raises(WorkerError, match="WORKER_TOKEN"):
            await wrong.health(timeout=5)
        # Startup gives up at once: waiting would not make a wrong token right.
        started = time.monotonic()
        with pytest.raises(WorkerError, match="Health failed on rank 0: missing or wrong worker token"):
            await wrong.wait_ready(timeout=60)
        assert time.monotonic() - started < 10
    finally:
        await wrong.close()


def test_an_empty_token_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        TokenInterceptor("")


def test_listen_without_a_token_exits_2(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr(worker_main, "setup_logging", lambda rank, level: None)
    config = WorkerConfig(model_dir=tiny_model_dir, dtype="float32", num_blocks=8)
    argv = ["--config-json", config.to_json(), "--listen", f"127.0.0.1:{free_port()}"]
    assert worker_main.main(argv) == 2
    assert "--listen needs a non-empty worker token" in caplog.text
