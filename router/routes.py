"""HTTP handlers and the route table. Handlers stay thin: parse, validate, run, shape the JSON."""

from __future__ import annotations

import functools
import json
import time
from importlib import metadata
from typing import TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from router import infer
from router.client import WorkerError
from router.errors import BodyError, NotImplementedYetError, UnsupportedMediaTypeError
from router.middleware import error_response
from router.schemas import CompatGenerateRequest, GenerateRequest, generate_response_json
from router.sequence import GenerationResult
from router.state import STATE, State

HEALTH_TIMEOUT_S = 5.0
# TGI's default --max-client-batch-size (prompts per /v1/completions call).
MAX_CLIENT_BATCH_SIZE = 4

_dumps = functools.partial(json.dumps, allow_nan=False)
Body = TypeVar("Body", bound=BaseModel)


def setup_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.post("/generate", generate),
            web.post("/", compat_generate),
            web.get("/health", health),
            web.get("/", health),
            web.get("/ping", health),
            web.get("/info", info),
        ]
    )


async def generate(request: web.Request) -> web.Response:
    """TGI `POST /generate`: one GenerateResponse object."""
    state = request.app[STATE]
    with state.concurrency.acquire():
        body = await read_json(request, GenerateRequest)
        return await _generate(state, body, as_list=False)


async def compat_generate(request: web.Request) -> web.Response:
    """TGI `POST /`: a GenerateRequest plus `stream`; non-streaming answers a one-element array."""
    state = request.app[STATE]
    with state.concurrency.acquire():
        body = await read_json(request, CompatGenerateRequest)
        if body.stream:
            raise NotImplementedYetError("`stream: true` is not supported by this server yet")
        return await _generate(state, body, as_list=True)


async def health(request: web.Request) -> web.Response:
    """200 with an empty body when every worker rank answers Health, else TGI's 503."""
    try:
        await request.app[STATE].client.health(timeout=HEALTH_TIMEOUT_S)
    except WorkerError:
        return error_response(503, "unhealthy", "healthcheck")
    return web.Response(status=200)


async def info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    lim, w = state.limits, state.worker_info
    return web.json_response(
        {
            "model_id": state.config.model_id,
            "model_sha": None,
            "model_dtype": w.dtype,
            "model_device_type": w.device_type,
            "model_pipeline_tag": None,
            "max_concurrent_requests": lim.max_concurrent_requests,
            "max_best_of": lim.max_best_of,
            "max_stop_sequences": lim.max_stop_sequences,
            "max_input_tokens": lim.max_input_tokens,
            "max_total_tokens": lim.max_total_tokens,
            "max_top_n_tokens": lim.max_top_n_tokens,
            "waiting_served_ratio": lim.waiting_served_ratio,
            "max_waiting_tokens": lim.max_waiting_tokens,
            "max_batch_prefill_tokens": lim.max_batch_prefill_tokens,
            "max_batch_total_tokens": lim.max_batch_total_tokens,
            "max_batch_size": lim.max_batch_size,
            "max_client_batch_size": MAX_CLIENT_BATCH_SIZE,
            "num_shard": state.client.world_size,
            "kv_block_size": w.block_size,
            "kv_num_blocks": w.num_blocks,
            "router": "multilora-router",
            "version": _version(),
            "sha": None,
            "docker_label": None,
            "adapters": [a.to_json() for a in state.adapters.infos()],
        }
    )


# ---- helpers ------------------------------------------------------------------------------------


async def read_json(request: web.Request, model: type[Body]) -> Body:
    """The body as `model`: 415 without a JSON content type, 400 if not JSON, 422 if not the model."""
    if hdrs.CONTENT_TYPE not in request.headers or not _is_json(request.content_type):
        raise UnsupportedMediaTypeError()
    raw = await request.read()
    if not raw.strip():
        raise BodyError("Failed to parse the request body as JSON: the body is empty", 400)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"Failed to parse the request body as JSON: {e}", 400) from None
    try:
        return model.model_validate(data)
    except PydanticValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise BodyError(
            f"Failed to deserialize the JSON body into the target type: {problems}", 422
        ) from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def _generate(state: State, body: GenerateRequest, *, as_list: bool) -> web.Response:
    start = time.monotonic()
    valid = state.validator.validate(body)
    validated = time.monotonic()
    best, others = await infer.generate(state.scheduler, valid)
    payload = generate_response_json(
        best,
        others,
        details=valid.details,
        prefill=valid.decoder_input_details,
        prefix=valid.inputs if valid.return_full_text else "",
    )
    headers = _timing_headers(state, valid.inputs, best, start, validated)
    return web.json_response([payload] if as_list else payload, headers=headers, dumps=_dumps)


def _timing_headers(
    state: State, inputs: str, r: GenerationResult, start: float, validated: float
) -> dict[str, str]:
    """TGI's x-* headers; times in milliseconds except x-compute-time (seconds)."""
    total = time.monotonic() - start
    ms = lambda s: str(int(s * 1000))  # noqa: E731
    return {
        "x-compute-type": state.worker_info.device_type or "unknown",
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": ms(total),
        "x-validation-time": ms(validated - start),
        "x-queue-time": ms(r.queue_s),
        "x-inference-time": ms(r.inference_s),
        "x-time-per-token": ms(r.inference_s / max(r.generated_tokens, 1)),
        "x-prompt-tokens": str(r.prompt_tokens),
        "x-generated-tokens": str(r.generated_tokens),
    }


@functools.cache
def _version() -> str:
    try:
        return metadata.version("multilora")
    except metadata.PackageNotFoundError:
        return "unknown"
