"""Requests in flight against a launcher, over each API, with what each client ended up seeing.

`Outcome.kind` is "http" (/generate), "sse" (/generate_stream) or "grpc" (public GenerateStream);
`status` the HTTP status or gRPC code name, None when the connection dropped without a response;
`error` the error the client got (an error status or body, an SSE error event, a gRPC error status);
`tokens` the token ids received; `done` when it ended (time.monotonic()).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp
import grpc

from proto import public_pb2 as pb
from proto.public_pb2_grpc import TextGenerationStub

PROMPT = "Once upon a time"


@dataclass
class Outcome:
    kind: str
    adapter: str | None
    status: int | str | None = None
    error: str | None = None
    tokens: tuple[int, ...] = ()
    done: float = 0.0


def body(adapter: str | None, max_new_tokens: int) -> dict:
    params: dict = {"max_new_tokens": max_new_tokens, "details": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    return {"inputs": PROMPT, "parameters": params}


async def http_generate(session: aiohttp.ClientSession, url: str, adapter: str | None, n: int) -> Outcome:
    out = Outcome("http", adapter)
    try:
        async with session.post(url + "/generate", json=body(adapter, n)) as resp:
            out.status, raw = resp.status, await resp.json()
        if out.status == 200:
            out.tokens = tuple(t["id"] for t in raw["details"]["tokens"])
        else:
            out.error = raw["error"]
    except aiohttp.ClientError as e:
        out.status = None
        out.error = repr(e)
    out.done = time.monotonic()
    return out


async def sse_generate(session: aiohttp.ClientSession, url: str, adapter: str | None, n: int) -> Outcome:
    out = Outcome("sse", adapter)
    tokens = []
    try:
        async with session.post(url + "/generate_stream", json=body(adapter, n)) as resp:
            out.status = resp.status
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out.error = event["error"]
                else:
                    tokens.append(event["token"]["id"])
        if out.status == 200 and out.error is None and len(tokens) < n:
            out.error = f"stream ended after {len(tokens)} of {n} tokens without an error event"
            out.status = None
    except aiohttp.ClientError as e:
        out.status, out.error = None, repr(e)
    out.tokens = tuple(tokens)
    out.done = time.monotonic()
    return out


async def grpc_generate(port: int, adapter: str | None, n: int) -> Outcome:
    out = Outcome("grpc", adapter)
    params = pb.GenerateParameters(max_new_tokens=n)
    if adapter is not None:
        params.adapter_id = adapter
    tokens = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = TextGenerationStub(channel).GenerateStream(
            pb.GenerateRequest(inputs=PROMPT, parameters=params)
        )
        try:
            async for message in call:
                tokens.append(message.token.id)
            out.status = "OK"
        except grpc.aio.AioRpcError as e:
            out.status, out.error = e.code().name, e.details()
    out.tokens = tuple(tokens)
    out.done = time.monotonic()
    return out
