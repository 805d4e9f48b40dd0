"""Reliability fixtures: the tiny e2e model and adapters, and launcher processes on loopback.

`served` is one launcher shared by the tests that leave it running (load, disconnects, access): API_KEY
set, few concurrent requests (so a load test meets 429s), the public gRPC API on a free port, and the
e2e adapters' directory as its adapter root (so the load route has adapters to load). Tests that kill
or stop a server start their own with `launch`.
"""

from __future__ import annotations

import signal

import pytest

from tests.e2e.conftest import e2e_adapters, e2e_model_dir  # noqa: F401 - fixtures used here
from tests.e2e.harness import Server
from tests.e2e.test_serving import tiny_env

API_KEY = "reliability-key"
MAX_CONCURRENT_REQUESTS = 16
PAYLOAD_LIMIT = 100_000


@pytest.fixture
def launch(tmp_path):
    """`launch(model_dir, adapters, **env) -> Server` (not waited for); every server is gone afterwards."""
    servers: list[Server] = []

    def start(model_dir, adapters, **env) -> Server:
        log = tmp_path / f"launcher-{len(servers)}.log"
        server = Server(log, env=tiny_env(model_dir, adapters, **env))
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.signal(signal.SIGKILL)
        server.wait(timeout=60)


@pytest.fixture(scope="session")
def served(e2e_model_dir, e2e_adapters, tmp_path_factory):  # noqa: F811
    env = tiny_env(
        e2e_model_dir,
        e2e_adapters,
        API_KEY=API_KEY,
        MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT_REQUESTS),
        PAYLOAD_LIMIT=str(PAYLOAD_LIMIT),
        GRPC_PORT="0",
        LORA_ADAPTER_ROOTS=str(next(iter(e2e_adapters.values())).parent),
        # The torch paths: these tests watch requests mid-generation, and with the native CPU kernels
        # the tiny model's steps are so short that generations end before the watching can tell.
        NATIVE_CPU_KERNELS="false",
    )
    server = Server(tmp_path_factory.mktemp("served") / "launcher.log", env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log()
