"""Access to a running launcher: API_KEY on every POST route and private GET route (HTTP routes taken from
the app's own route table, RPCs from the public service's descriptor, so a new one cannot slip by),
PAYLOAD_LIMIT, the worker sockets' permissions, and no API_KEY on a child's command line or in its
environment."""

from __future__ import annotations

import http.client
import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message

from proto import public_pb2 as pb
from router.app import create_app
from router.auth import PRIVATE_GET_ROUTES
from router.config import RouterConfig
from tests.reliability.conftest import API_KEY, PAYLOAD_LIMIT
from tests.reliability.scrape import grpc_port
from tests.route_bodies import BODIES  # any POST route must be listed (a new one gets its body)

pytestmark = pytest.mark.slow

SERVICE = pb.DESCRIPTOR.services_by_name["TextGeneration"]
GENERATION_ROUTES = {
    "/generate",
    "/generate_stream",
    "/",
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
}


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the router app (built, not started)."""
    app = create_app(RouterConfig(model_id="m", model_dir="/nonexistent", worker_uds=["/nonexistent"]))
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def request(url: str, method: str, data: bytes | None, token: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_every_http_generation_route_needs_the_key(served):
    routes = app_routes()
    posts = {path for method, path in routes if method == "POST"}
    assert posts >= GENERATION_ROUTES
    assert posts <= set(BODIES), f"POST routes without a test body: {posts - set(BODIES)}"
    for path in sorted(posts):
        data = json.dumps(BODIES[path]).encode()
        for token in (None, "wrong", API_KEY.upper()):
            status, body = request(served.url + path, "POST", data, token)
            assert status == 401, (path, token, body)
        status, body = request(served.url + path, "POST", data, API_KEY)
        assert status == 200, (path, body)
    for method, path in sorted(routes - {("POST", p) for p in posts}):
        assert method == "GET", (method, path)
        status, body = request(served.url + path, "GET", None, None)
        assert status == (401 if path in PRIVATE_GET_ROUTES else 200), (path, body)
        if path in PRIVATE_GET_ROUTES:
            assert request(served.url + path, "GET", None, API_KEY)[0] == 200, path


def _stub_call(channel: grpc.Channel, method):
    """A callable for `method` of the public service, built from its descriptor."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    call = kind(
        f"/{SERVICE.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return request_cls, call


def _invoke(call, message, token: str | None) -> grpc.StatusCode:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    try:
        result = call(message, metadata=metadata, timeout=60)
        if not isinstance(result, Message):
            list(result)  # a stream: read it to its end
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# Each RPC's fields for a call that succeeds, and the string field a too large message fills (None: the
# message has no field to fill). In order, LoadAdapter loads what UnloadAdapter unloads.
_GENERATE = {"inputs": "Hi", "parameters": pb.GenerateParameters(max_new_tokens=2)}
RPC_MESSAGES = {
    "Generate": (_GENERATE, "inputs"),
    "GenerateStream": (_GENERATE, "inputs"),
    "LoadAdapter": ({"lora_name": "grpc-access", "lora_path": "b_r8"}, "lora_path"),
    "UnloadAdapter": ({"lora_name": "grpc-access"}, "lora_name"),
    "ListAdapters": ({}, None),
}


def test_every_rpc_needs_the_key_and_obeys_the_payload_limit(served):
    assert [m.name for m in SERVICE.methods] == list(RPC_MESSAGES)  # a new RPC gets its message here
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port(served)}") as channel:
        for method in SERVICE.methods:
            request_cls, call = _stub_call(channel, method)
            fields, big_field = RPC_MESSAGES[method.name]
            message = request_cls(**fields)
            for token in (None, "wrong"):
                assert _invoke(call, message, token) == grpc.StatusCode.UNAUTHENTICATED, method.name
            assert _invoke(call, message, API_KEY) == grpc.StatusCode.OK, method.name
            if big_field is not None:
                big = request_cls(**{big_field: "x" * (PAYLOAD_LIMIT + 1)})
                assert _invoke(call, big, API_KEY) == grpc.StatusCode.RESOURCE_EXHAUSTED, method.name


def post_chunked(port: int, path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """A body without Content-Length (chunked), so that only reading it can tell its size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    conn.request("POST", path, body=iter(chunks), headers=headers, encode_chunked=True)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_payload_limit_is_413_on_every_post_route(served):
    posts = sorted(path for method, path in app_routes() if method == "POST")
    data = b'{"inputs": "' + b"x" * PAYLOAD_LIMIT + b'"}'
    for path in posts:
        status, body = request(served.url + path, "POST", data, API_KEY)
        assert status == 413, (path, body)
        status, body = post_chunked(
            served.port, path, [data[i : i + 4096] for i in range(0, len(data), 4096)]
        )
        assert status == 413, (path, "chunked", body)


def _proc_args(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_children_carry_no_api_key_in_cmdline_or_environment(served):
    pids = served.child_pids()
    assert {"router", "worker-0"} <= set(pids)
    for name, pid in pids.items():
        assert API_KEY not in Path(f"/proc/{pid}/cmdline").read_text(), name
        assert API_KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), name


def test_worker_sockets_are_private(served):
    args = _proc_args(served.child_pids()["worker-0"])
    socket_path = Path(args[args.index("--uds") + 1])
    sock, directory = socket_path.stat(), socket_path.parent.stat()
    assert stat.S_ISSOCK(sock.st_mode)
    assert sock.st_uid == directory.st_uid == os.getuid()
    assert stat.S_IMODE(sock.st_mode) & 0o077 == 0, oct(sock.st_mode)
    assert stat.S_IMODE(directory.st_mode) == 0o700, oct(directory.st_mode)
