"""HTTP handlers and the route table. Handlers stay thin: parse, validate, run, shape the JSON."""

from __future__ import annotations

import functools
import json
import time
from importlib import metadata

from aiohttp import hdrs, web

from router import infer, openai_routes, openapi, stream
from router.client import WorkerError
from router.errors import ValidationError
from router.http_common import read_json, timing_headers
from router.metrics import CONTENT_TYPE, RequestRecord, render
from router.middleware import error_response
from router.schemas import CompatGenerateRequest, GenerateRequest, generate_response_json
from router.state import STATE, State

HEALTH_TIMEOUT_S = 5.0

_dumps = functools.partial(json.dumps, allow_nan=False)


def setup_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.post("/generate", generate),
            web.post("/generate_stream", generate_stream),
            web.post("/", compat_generate),
            web.get("/health", health),
            web.get("/", health),
            web.get("/ping", health),
            web.get("/info", info),
            web.get("/metrics", metrics),
            web.post("/tokenize", tokenize),
            web.post("/v1/chat/completions", openai_routes.chat_completions),
            web.post("/v1/completions", openai_routes.completions),
            web.get("/v1/models", openai_routes.models),
            web.get("/docs", openapi.docs),
            web.get("/api-doc/openapi.json", openapi.spec),
            web.get("/openapi.json", openapi.spec),
        ]
    )


async def generate(request: web.Request) -> web.StreamResponse:
    """TGI `POST /generate`: one GenerateResponse object. With `"stream": true` (which TGI ignores here)
    it streams as /generate_stream does: huggingface_hub given `base_url=.../generate` posts its streams to
    it, and would read a JSON answer as an empty stream."""
    state = request.app[STATE]
    with state.metrics.request() as record, state.concurrency.acquire():
        body = await read_json(request, CompatGenerateRequest)
        if body.stream:
            return await stream.generate_stream(request, state, body, record)
        return await _generate(state, body, record, as_list=False)


async def compat_generate(request: web.Request) -> web.Response:
    """TGI `POST /`: a GenerateRequest plus `stream`; non-streaming answers a one-element array, streaming
    answers as /generate_stream does."""
    state = request.app[STATE]
    with state.metrics.request() as record, state.concurrency.acquire():
        body = await read_json(request, CompatGenerateRequest)
        if body.stream:
            return await stream.generate_stream(request, state, body, record)
        return await _generate(state, body, record, as_list=True)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """TGI `POST /generate_stream`: server-sent events, one per token (router/stream.py)."""
    state = request.app[STATE]
    with state.metrics.request() as record, state.concurrency.acquire():
        body = await read_json(request, GenerateRequest)
        return await stream.generate_stream(request, state, body, record)


async def health(request: web.Request) -> web.Response:
    """200 with an empty body when every worker rank answers Health, else TGI's 503."""
    try:
        await request.app[STATE].client.health(timeout=HEALTH_TIMEOUT_S)
    except WorkerError:
        return error_response(503, "unhealthy", "healthcheck")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    """TGI `GET /metrics`: Prometheus text format (router/metrics.py lists the metrics)."""
    text = render(request.app[STATE].metrics.registry)
    return web.Response(body=text.encode(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})


async def tokenize(request: web.Request) -> web.Response:
    """TGI `POST /tokenize`: a GenerateRequest's prompt as `[{id, text, start, stop}]` (character offsets;
    special tokens have empty text), truncated like generation when `parameters.truncate` is set."""
    state = request.app[STATE]
    body = await read_json(request, GenerateRequest)
    truncate, max_input = body.parameters.truncate, state.limits.max_input_tokens
    if truncate is not None and not 0 < truncate <= max_input:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {max_input}. Given: {truncate}"
        )
    enc = state.tokenizer.encoding(body.inputs, truncate)
    tokens = [
        {"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
        for i, (start, stop) in zip(enc.ids, enc.offsets, strict=True)
    ]
    return web.json_response(tokens, dumps=_dumps)


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
            "max_client_batch_size": openai_routes.MAX_CLIENT_BATCH_SIZE,
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


async def _generate(
    state: State, body: GenerateRequest, record: RequestRecord, *, as_list: bool
) -> web.Response:
    start = time.monotonic()
    valid, best, others = await infer.run(state.validator, state.scheduler, body, record)
    validated = record.validated_at or start
    payload = generate_response_json(
        best,
        others,
        details=valid.details,
        prefill=valid.decoder_input_details,
        prefix=valid.inputs if valid.return_full_text else "",
    )
    headers = timing_headers(state, valid.inputs, best, start, validated)
    return web.json_response([payload] if as_list else payload, headers=headers, dumps=_dumps)


@functools.cache
def _version() -> str:
    try:
        return metadata.version("multilora")
    except metadata.PackageNotFoundError:
        return "unknown"
