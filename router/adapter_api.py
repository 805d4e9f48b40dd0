"""Adapter management over the registry (router/adapter_registry.py): vLLM's routes, so its users'
scripts work, and the same as public gRPC methods (router/grpc_service.py).

- `POST /v1/load_lora_adapter {"lora_name", "lora_path", "pinned"?}`: `lora_path` is a directory inside an
  adapter root or a Hub repo id; the adapter is loaded before the answer, so its errors surface here.
  200 with vLLM's plain-text message; a name already registered is a 400 (as vLLM).
- `POST /v1/unload_lora_adapter {"lora_name"}`: the name is unroutable at once; requests in flight
  finish with its weights, which are freed after them. An unknown name is a 404.
- `GET /v1/adapters`: every registered adapter (and unloaded ones still draining), as `adapter_json`.
All three need API_KEY when it is set (router/auth.py). Errors: router/errors.py `adapter_error`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proto import public_pb2 as pb
from router.adapter_registry import AdapterRegistry
from router.adapters import AdapterEntry, AdapterExistsError, UnknownAdapterError
from router.errors import ADAPTER_ERRORS, adapter_error
from router.http_common import read_json
from router.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from router.state import STATE


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's `POST /v1/load_lora_adapter`: register `lora_name` and load it from `lora_path` now."""
    body = await read_json(request, LoadLoraAdapterRequest)
    await load(request.app[STATE].adapters, body.lora_name, body.lora_path, body.pinned)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's `POST /v1/unload_lora_adapter`: `lora_name` unroutable now, its memory freed after the
    requests using it."""
    body = await read_json(request, UnloadLoraAdapterRequest)
    await unload(request.app[STATE].adapters, body.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def list_adapters(request: web.Request) -> web.Response:
    """`GET /v1/adapters`: each adapter's source, rank, bytes per tier, state and use."""
    registry = request.app[STATE].adapters
    return web.json_response({"adapters": [adapter_json(registry, e) for e in registry.entries()]})


async def load(registry: AdapterRegistry, name: str, lora_path: str, pinned: bool) -> AdapterEntry:
    """The load route's work, its errors as the route answers them."""
    try:
        return await registry.load(name, lora_path, pinned)
    except (*ADAPTER_ERRORS, AdapterExistsError) as e:
        raise adapter_error(e, "load") from None


async def unload(registry: AdapterRegistry, name: str) -> None:
    try:
        await registry.unload(name)
    except UnknownAdapterError as e:
        raise adapter_error(e, "unload") from None


def adapter_json(registry: AdapterRegistry, e: AdapterEntry) -> dict[str, Any]:
    info, residency = e.info, e.residency
    error = None if residency is not None else registry.failure(e.name)
    return {
        "name": e.name,
        "source": e.kind,
        "origin": e.origin,
        "path": None if e.path is None else str(e.path),
        "revision": e.revision,
        "rank": None if info is None else info.lora_rank,
        "alpha": None if info is None else info.alpha,
        "target_modules": [] if info is None else list(info.target_modules),
        "bytes": {
            # Rank 0's share (each rank holds its shard); host: as the ranks last reported.
            "device": info.weight_bytes if info is not None and residency is not None else 0,
            "host": info.weight_bytes if info is not None and residency is None and e.in_host else 0,
            "disk": e.disk_bytes,
        },
        "state": "failed" if error is not None and e.state == "not_resident" else e.state,
        "error": error,
        "pinned": e.pinned,
        "requests_in_flight": e.refs,
        "last_used": e.last_used,
        "slot": None if residency is None else residency.slot,
        "generation": None if residency is None else residency.generation,
    }


def adapter_message(registry: AdapterRegistry, e: AdapterEntry) -> pb.Adapter:
    """`adapter_json` as the public API's message (unset where the JSON has null)."""
    data = adapter_json(registry, e)
    data["bytes"] = pb.AdapterBytes(**data["bytes"])
    return pb.Adapter(**{k: v for k, v in data.items() if v is not None})


def info_json(e: AdapterEntry) -> dict[str, Any]:
    """An adapter in GET /info (loaded at least once, so its info is known)."""
    assert e.info is not None
    return {
        "id": e.name,
        "source": e.origin,
        "rank": e.info.lora_rank,  # /info's documented key (router/responses.py)
        "alpha": e.info.alpha,
        "use_rslora": e.info.use_rslora,
        "target_modules": list(e.info.target_modules),
        "state": e.state,
        "pinned": e.pinned,
    }
