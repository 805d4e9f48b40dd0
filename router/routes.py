"""HTTP handlers and the route table. Handlers stay thin: parse, validate, run, shape the JSON.

`ROUTES` is the one route table: `setup_routes` registers it and the OpenAPI document (router/openapi.py)
describes it, so adding a route means adding it here, with its documentation.
"""

from __future__ import annotations

import functools
import json
import time

from aiohttp import hdrs, web

from router import adapter_api, lifecycle, openai_routes, stream
from router.auth import request_tenant
from router.client import WorkerError
from router.errors import ValidationError
from router.http_common import read_json, server_version, timing_headers
from router.metrics import CONTENT_TYPE, RequestRecord, render
from router.middleware import error_response
from router.openai_params import MAX_CLIENT_BATCH_SIZE
from router.openai_schemas import ChatCompletionRequest, CompletionRequest
from router.openapi import DONE, GENERATION_ERRORS, HTML, TEXT, Route, build, render_html
from router.responses import (
    AdapterList,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    GenerateResponse,
    Info,
    ModelList,
    OpenAIErrorResponse,
    SimpleToken,
    StreamResponse,
)
from router.schemas import (
    CompatGenerateRequest,
    GenerateRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    generate_response_json,
)
from router.state import CONFIG, STATE, State

HEALTH_TIMEOUT_S = 5.0

_dumps = functools.partial(json.dumps, allow_nan=False)


def setup_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.get(r.path, r.handler) if r.method == "GET" else web.route(r.method, r.path, r.handler)
            for r in ROUTES
        ]
    )


async def generate(request: web.Request) -> web.StreamResponse:
    """TGI `POST /generate`: one GenerateResponse object. With `"stream": true` (which TGI ignores here)
    it streams as /generate_stream does: huggingface_hub given `base_url=.../generate` posts its streams to
    it, and would read a JSON answer as an empty stream."""
    state = request.app[STATE]
    with lifecycle.admitted(state, request_tenant(request)) as record:
        body = await read_json(request, CompatGenerateRequest)
        if body.stream:
            return await stream.generate_stream(request, state, body, record)
        return await _generate(state, body, record, as_list=False)


async def compat_generate(request: web.Request) -> web.Response:
    """TGI `POST /`: a GenerateRequest plus `stream`; non-streaming answers a one-element array, streaming
    answers as /generate_stream does."""
    state = request.app[STATE]
    with lifecycle.admitted(state, request_tenant(request)) as record:
        body = await read_json(request, CompatGenerateRequest)
        if body.stream:
            return await stream.generate_stream(request, state, body, record)
        return await _generate(state, body, record, as_list=True)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """TGI `POST /generate_stream`: server-sent events, one per token (router/stream.py)."""
    state = request.app[STATE]
    with lifecycle.admitted(state, request_tenant(request)) as record:
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
    """TGI `GET /info`: the model, the limits, and (ours) the KV cache and the loaded adapters."""
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
            "version": server_version(),
            "sha": None,
            "docker_label": None,
            "adapters": [adapter_api.info_json(a) for a in state.adapters.loaded()],
        }
    )


async def spec(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return web.json_response(_document(bool(request.app[CONFIG].tenant_keys())))


async def docs(request: web.Request) -> web.Response:
    """The API documentation as one HTML page."""
    doc = _document(bool(request.app[CONFIG].tenant_keys()))
    return web.Response(text=render_html(doc), content_type="text/html")


async def _generate(
    state: State, body: GenerateRequest, record: RequestRecord, *, as_list: bool
) -> web.Response:
    start = time.monotonic()
    async with lifecycle.tgi_submitted(state, record, body) as submission:
        ((best, others),) = await submission.results()
    valid = submission.requests[0]
    payload = generate_response_json(
        best,
        others,
        details=valid.details,
        prefill=valid.decoder_input_details,
        prefix=valid.inputs if valid.return_full_text else "",
    )
    headers = timing_headers(state, valid.inputs, best, start, submission.validated_at)
    return web.json_response([payload] if as_list else payload, headers=headers, dumps=_dumps)


@functools.cache
def _document(auth: bool) -> dict:
    return build(ROUTES, auth=auth, version=server_version())


_HEALTH = "200 with an empty body when every worker rank answers, else 503"
_GEN, _SERVICE, _OPENAI, _ADAPTERS = "Text Generation", "Service", "OpenAI", "Adapters"
_OPENAI_ERRORS = (*GENERATION_ERRORS, 404)
_LOAD_ERRORS = (400, 401, 404, 413, 415, 422, 424, 502, 503)

ROUTES = (
    Route("POST", "/generate", generate, "Generate text (TGI); /generate_stream's events if `stream`", _GEN,
          CompatGenerateRequest, GenerateResponse, stream=StreamResponse, errors=GENERATION_ERRORS),
    Route("POST", "/generate_stream", generate_stream, "Generate text, one server-sent event per token (TGI)",
          _GEN, GenerateRequest, stream=StreamResponse, errors=GENERATION_ERRORS),
    Route("POST", "/", compat_generate,
          "TGI's compat route: a one-element array, or /generate_stream's events if `stream`", _GEN,
          CompatGenerateRequest, list[GenerateResponse], stream=StreamResponse, errors=GENERATION_ERRORS),
    Route("POST", "/tokenize", tokenize, "Tokenize a prompt as generation would", _GEN, GenerateRequest,
          list[SimpleToken], errors=(400, 401, 413, 415, 422)),
    Route("GET", "/health", health, _HEALTH, _SERVICE, errors=(503,)),
    Route("GET", "/", health, _HEALTH, _SERVICE, errors=(503,)),
    Route("GET", "/ping", health, _HEALTH, _SERVICE, errors=(503,)),
    Route("GET", "/info", info, "Model, limits and loaded adapters", _SERVICE, response=Info),
    Route("GET", "/metrics", metrics, "Prometheus metrics (TGI's names)", _SERVICE, response=str,
          content_type=TEXT),
    Route("GET", "/docs", docs, "This API's documentation", _SERVICE, response=str, content_type=HTML),
    Route("GET", "/api-doc/openapi.json", spec, "The OpenAPI document (TGI's path)", _SERVICE, response=dict),
    Route("GET", "/openapi.json", spec, "The OpenAPI document", _SERVICE, response=dict),
    Route("POST", "/v1/chat/completions", openai_routes.chat_completions,
          "OpenAI chat completion (chat template); `model` picks the adapter", _OPENAI, ChatCompletionRequest,
          ChatCompletion, stream=ChatCompletionChunk, stream_end=DONE, errors=_OPENAI_ERRORS,
          error=OpenAIErrorResponse),
    Route("POST", "/v1/completions", openai_routes.completions,
          f"OpenAI (legacy) completion, up to {MAX_CLIENT_BATCH_SIZE} prompts; `model` picks the adapter",
          _OPENAI, CompletionRequest, Completion, stream=Completion, stream_end=DONE, errors=_OPENAI_ERRORS,
          error=OpenAIErrorResponse),
    Route("GET", "/v1/models", openai_routes.models, "The base model and its adapters (OpenAI's model list)",
          _OPENAI, response=ModelList),
    Route("POST", "/v1/load_lora_adapter", adapter_api.load_lora_adapter,
          "Register an adapter and load it now (vLLM's route)", _ADAPTERS, LoadLoraAdapterRequest, str,
          content_type=TEXT, errors=_LOAD_ERRORS),
    Route("POST", "/v1/unload_lora_adapter", adapter_api.unload_lora_adapter,
          "Unload an adapter: unroutable now, freed after its requests (vLLM's route)", _ADAPTERS,
          UnloadLoraAdapterRequest, str, content_type=TEXT, errors=(400, 401, 404, 413, 415, 422)),
    Route("GET", "/v1/adapters", adapter_api.list_adapters,
          "The registered adapters: source, rank, bytes per tier, state, use", _ADAPTERS,
          response=AdapterList, errors=(401,)),
)  # fmt: skip
