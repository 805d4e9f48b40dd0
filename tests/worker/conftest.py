"""Fixtures of the worker gRPC server tests (helpers in server_harness.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
import pytest

from proto import generate_pb2_grpc as pb_grpc
from tests.worker.server_harness import Worker, worker_config
from worker.runner import ModelRunner
from worker.server import start_server, stop_server


@pytest.fixture
def sock_dir():
    # pytest's tmp_path can exceed the ~107-byte limit of a unix socket path.
    with tempfile.TemporaryDirectory(prefix="mlw-") as d:
        yield Path(d)


@pytest.fixture
async def worker(tiny_model_dir, sock_dir):
    runner = ModelRunner(worker_config(tiny_model_dir))
    server, servicer = await start_server(runner, sock_dir / "rank0.sock")
    async with grpc.aio.insecure_channel(f"unix://{sock_dir}/rank0.sock") as channel:
        yield Worker(pb_grpc.TextGenerationServiceStub(channel), runner)
    await stop_server(server, servicer, grace_s=0)
