"""No request field makes the router read a file outside its adapter roots and HF cache: adapter ids that
look like paths (absolute, `..`, a configured adapter's own path or source) are refused with a 4xx naming
the field, on every route and RPC that takes one (gRPC: INVALID_ARGUMENT), as are such `lora_path`s on
the load route, and nothing is opened or loaded meanwhile (the opens are watched with a Python audit
hook; the fake workers record every LoadAdapter)."""

from __future__ import annotations

import sys
import threading

import grpc
import pytest

from proto import public_pb2 as pb
from proto.public_pb2_grpc import TextGenerationStub
from router.grpc_service import GRPC_PORT
from tests.router.conftest import (  # noqa: F401 - fixtures
    ADAPTER_IDS,
    adapter_root,
    encode,
    sock_dir,
    start_router,
    tiny_tokenizer_dir,
)

BAD_IDS = [
    "/etc/passwd",
    "../x",
    "../../../../etc/passwd",
    "adapter-two/../../etc/passwd",
    "/adapters/adapter-two",  # a configured adapter's path
    "hub:adapter-two",  # a configured adapter's source
    "file:///etc/passwd",
    "~/.ssh/id_rsa",
    "./adapter-two",
]


class OpenWatch:
    """Every path opened or listed by this process while `recording` (sys.addaudithook cannot be undone:
    one hook per process, switched on and off)."""

    _instance: OpenWatch | None = None

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.recording = threading.Event()
        sys.addaudithook(self._hook)

    @classmethod
    def get(cls) -> OpenWatch:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _hook(self, event: str, args: tuple) -> None:
        if self.recording.is_set() and event in ("open", "os.listdir", "os.scandir") and args:
            self.paths.append(str(args[0]))


def bodies(bad: str) -> list[tuple[str, dict, str]]:
    """(path, body, the field that carries `bad`) for every HTTP route taking an adapter."""
    gen = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "adapter_id": bad}}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return [
        ("/generate", gen, "adapter"),
        ("/generate_stream", gen, "adapter"),
        ("/", gen, "adapter"),
        ("/", {**gen, "stream": True}, "adapter"),
        ("/v1/chat/completions", {**chat, "model": bad}, "model"),
        ("/v1/chat/completions", {**chat, "adapter_id": bad}, "adapter_id"),
        ("/v1/chat/completions", {**chat, "model": bad, "stream": True}, "model"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "model": bad}, "model"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "adapter_id": bad}, "adapter_id"),
    ]


async def test_path_like_adapter_ids_are_refused_without_reading_files(start_router):  # noqa: F811
    h = await start_router(world_size=1, grpc_port=0)
    loads_at_start = len(h.fakes[0].requests("LoadAdapter"))
    assert loads_at_start == len(ADAPTER_IDS)
    watch = OpenWatch.get()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{h.http.server.app[GRPC_PORT]}")
    stub = TextGenerationStub(channel)
    watch.paths.clear()
    watch.recording.set()
    try:
        for bad in BAD_IDS:
            for path, body, field in bodies(bad):
                resp = await h.http.post(path, json=body)
                text = await resp.text()
                assert resp.status in (404, 422), (path, bad, resp.status, text)
                assert bad in text.replace("\\/", "/") and field in text, (path, bad, text)
            params = pb.GenerateParameters(max_new_tokens=2, adapter_id=bad)
            for call in (stub.Generate, stub.GenerateStream):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    result = call(pb.GenerateRequest(inputs="Hi", parameters=params))
                    if hasattr(result, "read"):
                        await result.read()
                    else:
                        await result
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
                assert bad in err.value.details(), bad
            resp = await h.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": bad})
            text = await resp.text()
            assert resp.status == 400 and "refused" in text and bad in text.replace("\\/", "/"), (bad, text)
    finally:
        watch.recording.clear()
        await channel.close()
    suspicious = [p for p in watch.paths if any(part in p for part in ("passwd", "adapter", "ssh", "/x"))]
    assert not suspicious, suspicious
    assert len(h.fakes[0].requests("LoadAdapter")) == loads_at_start
    # The hook does see opens: it is not silently off.
    watch.recording.set()
    try:
        open(__file__).close()  # noqa: SIM115
    finally:
        watch.recording.clear()
    assert watch.paths[-1] == __file__
