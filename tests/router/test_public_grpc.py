"""The public gRPC API (proto/public.proto) against the fake workers: the same results, errors and metrics
as HTTP, as status codes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import public_pb2 as pb
from proto.public_pb2_grpc import TextGenerationStub
from router.app import create_app
from router.client import ShardedClient
from router.config import RouterConfig
from router.grpc_service import GRPC_PORT, SERVICE_NAME
from tests.router.conftest import BASE_MODEL_ID, SCRIPTS
from tests.router.fake_worker import serve_fakes


@pytest.fixture
async def connect():
    """`await connect(harness)` -> (TextGenerationStub, HealthStub) on the router's gRPC port."""
    channels = []

    async def open_(h):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{h.http.server.app[GRPC_PORT]}")
        channels.append(channel)
        return TextGenerationStub(channel), health_pb2_grpc.HealthStub(channel)

    yield open_
    for channel in channels:
        await channel.close()


def request(inputs: str = "Hello", **parameters) -> pb.GenerateRequest:
    return pb.GenerateRequest(inputs=inputs, parameters=pb.GenerateParameters(**parameters))


async def _error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_generate_equals_http(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    params = {"max_new_tokens": 5, "details": True, "top_n_tokens": 2, "adapter_id": "org/adapter-one"}
    reply = await stub.Generate(request(**params))
    http = await (await h.generate("Hello", **params)).json()
    assert reply.generated_text == http["generated_text"] == SCRIPTS[1][:5]
    d, hd = reply.details, http["details"]
    assert d.finish_reason == pb.FINISH_REASON_LENGTH and hd["finish_reason"] == "length"
    assert (d.generated_tokens, d.prompt_tokens) == (hd["generated_tokens"], hd["prompt_tokens"]) == (5, 6)
    assert not d.HasField("seed") and hd["seed"] is None
    assert [(t.id, t.text, t.special) for t in d.tokens] == [
        (t["id"], t["text"], t["special"]) for t in hd["tokens"]
    ]
    assert [t.logprob for t in d.tokens] == pytest.approx([t["logprob"] for t in hd["tokens"]])
    assert [[t.id for t in top.tokens] for top in d.top_tokens] == [
        [t["id"] for t in top] for top in hd["top_tokens"]
    ]
    assert list(d.prefill) == [] and list(reply.best_of_sequences) == []


async def test_generate_defaults_and_options(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    reply = await stub.Generate(request(max_new_tokens=3))
    assert reply.generated_text == SCRIPTS[0][:3] and not reply.HasField("details")
    # No `parameters` at all: TGI's default parameters, which sample (a seed is chosen and returned).
    reply = await stub.Generate(pb.GenerateRequest(inputs="Hello"))
    assert reply.generated_text == SCRIPTS[0]
    reply = await stub.Generate(
        request(max_new_tokens=2, return_full_text=True, decoder_input_details=True, seed=7, do_sample=True)
    )
    assert reply.generated_text == "Hello" + SCRIPTS[0][:2]
    assert reply.details.seed == 7
    assert reply.details.prefill[0].text == "<s>" and not reply.details.prefill[0].HasField("logprob")
    assert [t.logprob for t in reply.details.prefill[1:]] == pytest.approx([-0.5] * 5)
    reply = await stub.Generate(request(max_new_tokens=2, best_of=2, do_sample=True, details=True))
    assert len(reply.best_of_sequences) == 1
    assert reply.best_of_sequences[0].details.generated_tokens == 2


async def test_generate_stream(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    replies = [
        r
        async for r in stub.GenerateStream(request(max_new_tokens=4, details=True, adapter_id="adapter-two"))
    ]
    assert [r.index for r in replies] == [1, 2, 3, 4]
    assert "".join(r.token.text for r in replies) == SCRIPTS[2][:4]
    assert [r.HasField("generated_text") for r in replies] == [False, False, False, True]
    last = replies[-1]
    assert last.generated_text == SCRIPTS[2][:4]
    assert last.details.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.details.generated_tokens, last.details.input_length) == (4, 6)
    assert not any(r.HasField("details") for r in replies[:-1])
    # To the end of sequence, without details.
    replies = [r async for r in stub.GenerateStream(request(max_new_tokens=100))]
    assert replies[-1].generated_text == SCRIPTS[0] and replies[-1].token.special
    assert not replies[-1].HasField("details")
    await h.settle()


async def test_invalid_argument_with_http_message(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    e = await _error(stub.Generate(request(max_new_tokens=2, temperature=0.0)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "Input validation error: `temperature` must be strictly positive"
    assert ("error-type", "validation") in tuple(e.trailing_metadata())
    # An optional field set to zero is set (HTTP's `"top_k": 0`), not left at its default.
    e = await _error(stub.Generate(request(max_new_tokens=2, top_k=0)))
    assert e.details() == "Input validation error: `top_k` must be strictly positive"
    e = await _error(stub.Generate(pb.GenerateRequest(inputs="")))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "Input validation error: `inputs` cannot be empty"
    e = await _error(stub.GenerateStream(request(best_of=2, do_sample=True)).read())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "Input validation error: `best_of` != 1 is not supported when streaming tokens"


DOUBLES = [f.name for f in pb.GenerateParameters.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_DOUBLE]


def test_the_message_has_these_doubles():
    assert set(DOUBLES) == {"frequency_penalty", "repetition_penalty", "temperature", "top_p", "typical_p"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", DOUBLES)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_non_finite_double_is_invalid_argument_naming_it(start_router, connect, method, field, value):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    call = getattr(stub, method)(request(max_new_tokens=2, **{field: value}))
    e = await _error(call if method == "Generate" else call.read())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        e.details()
        == f"Failed to deserialize the request: parameters.{field}: Input should be a finite number"
    )
    assert not [m for f in h.fakes for m, _ in f.calls if m in ("Prefill", "Decode")]


async def test_unknown_adapter_is_not_found(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    http = await (await h.generate("Hello", max_new_tokens=2, adapter_id="nope")).json()
    for call in (stub.Generate, lambda r: stub.GenerateStream(r).read()):
        e = await _error(call(request(max_new_tokens=2, adapter_id="nope")))
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert e.details() == http["error"]
    # The base model's id and "" select the base model.
    for base in (BASE_MODEL_ID, ""):
        assert (await stub.Generate(request(max_new_tokens=2, adapter_id=base))).generated_text == SCRIPTS[0][
            :2
        ]


async def test_overload_is_resource_exhausted_shared_with_http(start_router, connect):
    h = await start_router(world_size=1, grpc_port=0, max_concurrent_requests=1)
    stub, _ = await connect(h)
    h.fakes[0].step_delay = 0.05
    slow = asyncio.create_task(h.generate("Hi", max_new_tokens=4))
    await asyncio.sleep(0.02)
    e = await _error(stub.Generate(request(max_new_tokens=1)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.details() == "Model is overloaded"
    assert (await slow).status == 200
    streaming = stub.GenerateStream(request(max_new_tokens=4))
    await streaming.read()  # the stream holds the permit now
    assert (await h.generate("Hi", max_new_tokens=1)).status == 429
    while (await streaming.read()) is not grpc.aio.EOF:
        pass
    assert await streaming.code() == grpc.StatusCode.OK
    assert (await stub.Generate(request(max_new_tokens=1))).generated_text == SCRIPTS[0][:1]


async def test_api_key_metadata(start_router, connect):
    h = await start_router(grpc_port=0, api_key="k3y")
    stub, health = await connect(h)
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "k3y"),)):
        e = await _error(stub.Generate(request(max_new_tokens=1), metadata=metadata))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and e.details() == "Unauthorized"
        e = await _error(stub.GenerateStream(request(max_new_tokens=1), metadata=metadata).read())
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = (("authorization", "Bearer k3y"),)
    assert (await stub.Generate(request(max_new_tokens=1), metadata=ok)).generated_text == SCRIPTS[0][:1]
    assert [r async for r in stub.GenerateStream(request(max_new_tokens=2), metadata=ok)]
    # Health stays open.
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_follows_the_workers(start_router, connect):
    h = await start_router(grpc_port=0)
    _, health = await connect(h)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    h.fakes[1].healthy = False
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    e = await _error(health.Check(health_pb2.HealthCheckRequest(service="other")))
    assert e.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_count_grpc_requests(start_router, connect):
    h = await start_router(grpc_port=0)
    stub, _ = await connect(h)
    await stub.Generate(request(max_new_tokens=2, adapter_id="adapter-two"))
    assert [r async for r in stub.GenerateStream(request(max_new_tokens=2, adapter_id="adapter-two"))]
    await _error(stub.Generate(request(max_new_tokens=0, adapter_id="adapter-two")))
    value = h.state.metrics.registry.get_sample_value
    assert value("tgi_request_count_total", {"adapter": "adapter-two"}) == 3
    assert value("tgi_request_success_total", {"adapter": "adapter-two"}) == 2
    assert value("tgi_request_failure_total", {"adapter": "adapter-two", "err": "validation"}) == 1


async def test_cancelled_stream_frees_its_blocks(start_router, connect):
    h = await start_router(world_size=1, grpc_port=0)
    stub, _ = await connect(h)
    h.fakes[0].step_delay = 0.01
    call = stub.GenerateStream(request(max_new_tokens=50))
    await call.read()
    call.cancel()
    await h.settle()
    assert len(h.fakes[0].requests("Decode")) < 49


async def test_payload_limit_applies(start_router, connect):
    h = await start_router(grpc_port=0, payload_limit=1000)
    stub, _ = await connect(h)
    e = await _error(stub.Generate(request("x" * 2000)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_off_by_default(start_router):
    h = await start_router()
    assert GRPC_PORT not in h.http.server.app


async def test_port_in_use_stops_startup(sock_dir, tiny_tokenizer_dir):
    async with serve_fakes(sock_dir, 1, script={}) as (_, paths):
        client = ShardedClient(paths)
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            config = RouterConfig(
                model_id=BASE_MODEL_ID,
                model_dir=str(tiny_tokenizer_dir),
                worker_uds=paths,
                grpc_port=taken.getsockname()[1],
            )
            server = TestServer(create_app(config, client=client))
            try:
                with pytest.raises(OSError, match="the public gRPC API cannot listen on 0.0.0.0:"):
                    await server.start_server()
            finally:
                await server.close()
                await client.close()


async def test_grpc_drains_alongside_http_not_after(start_router, connect):
    # Both a gRPC stream and an HTTP request outlast the 1 s window: shutdown must take ~1 s, not 2.
    h = await start_router(world_size=1, grpc_port=0, shutdown_timeout_s=1.0)
    stub, _ = await connect(h)
    h.fakes[0].step_delay = 0.2
    call = stub.GenerateStream(request(max_new_tokens=20))
    await call.read()
    http = asyncio.create_task(h.generate("Hi", max_new_tokens=20))
    async with asyncio.timeout(5):
        while len(h.state.scheduler.running) < 2:
            await asyncio.sleep(0.01)
    start = asyncio.get_running_loop().time()
    await h.http.close()
    elapsed = asyncio.get_running_loop().time() - start
    assert 0.9 < elapsed < 1.8, elapsed
    with pytest.raises(grpc.aio.AioRpcError):  # cut off at the end of the window, not finished
        while await call.read() is not grpc.aio.EOF:
            pass
    with contextlib.suppress(aiohttp.ClientError):  # also cut off
        await http
