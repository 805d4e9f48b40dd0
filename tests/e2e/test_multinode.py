"""One tensor-parallel group across two launchers ("nodes") on this machine, over loopback TCP.

Node 0 (NODE_RANK=0) starts rank 0 on a unix socket and the router; node 1 starts rank 1, which serves gRPC
on 127.0.0.1:WORKER_PORT_BASE behind WORKER_TOKEN. Both ranks join one gloo world at MASTER_ADDR.
The group must give exactly the greedy tokens of a single-node NUM_SHARD=1 server (float32: see
test_serving.py), with an adapter too (LoadAdapter reaches the remote rank); the remote rank must refuse
calls without the token; both launchers must stop cleanly on SIGTERM.
"""

from __future__ import annotations

import secrets
import time

import grpc
import pytest

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from tests.e2e.harness import Server, free_port
from tests.e2e.test_serving import PROMPTS, run, tiny_env, token_ids

pytestmark = pytest.mark.slow

ADAPTER = "b_r8"


def call_remote_rank(address: str, token: str | None, request: object, method: str = "Health") -> None:
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        getattr(stub, method)(request, timeout=10, metadata=metadata)


def wait_for_group(node0: Server, node1: Server, timeout: float = 300.0) -> None:
    """Until node 0 serves; fails at once with node 1's log if node 1's launcher exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert node1.proc.poll() is None, f"node 1 exited with {node1.proc.returncode}:\n{node1.log()}"
        try:
            node0.wait_ready(timeout=2.0)
            return
        except AssertionError:
            if node0.proc.poll() is not None or time.monotonic() > deadline:
                raise


def test_two_nodes_equal_one_node(e2e_model_dir, e2e_adapters, tmp_path):
    adapters = {ADAPTER: e2e_adapters[ADAPTER]}
    cases = [(prompt, adapter) for adapter in (None, ADAPTER) for prompt in PROMPTS[:2]]

    single = Server(tmp_path / "single.log", env=tiny_env(e2e_model_dir, adapters))
    try:
        single.wait_ready()
        expected = {case: run(single, *case) for case in cases}
    finally:
        assert single.stop() == 0, single.log()

    token, worker_port = secrets.token_hex(16), free_port()
    group = tiny_env(
        e2e_model_dir,
        adapters,
        NUM_SHARD="2",
        NUM_NODES="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORKER_TOKEN=token,
    )
    node1 = Server(
        tmp_path / "node1.log", env={**group, "NODE_RANK": "1", "WORKER_PORT_BASE": str(worker_port)}
    )
    node0 = Server(
        tmp_path / "node0.log",
        env={**group, "NODE_RANK": "0", "WORKER_ADDRESSES": f"127.0.0.1:{worker_port}"},
    )
    try:
        wait_for_group(node0, node1)
        assert set(node0.child_pids()) == {"worker-0", "router"}, node0.log()
        assert set(node1.child_pids()) == {"worker-1"}, node1.log()
        for case, want in expected.items():
            body = run(node0, *case)
            assert token_ids(body) == token_ids(want), case
            assert body["generated_text"] == want["generated_text"], case

        remote = f"127.0.0.1:{worker_port}"
        call_remote_rank(remote, token, pb.HealthRequest())
        for bad in (None, "x" + token[1:], ""):
            for method, request in (("Health", pb.HealthRequest()), ("ClearCache", pb.ClearCacheRequest())):
                with pytest.raises(grpc.RpcError) as refused:
                    call_remote_rank(remote, bad, request, method)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (bad, method)
        assert run(node0, *cases[-1])["generated_text"] == expected[cases[-1]]["generated_text"]
    finally:
        code0 = node0.stop()
        code1 = node1.stop()
    assert code0 == 0, node0.log()
    assert code1 == 0, node1.log()
