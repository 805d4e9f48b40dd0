"""OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

`model` picks the adapter: the base model's id, "tgi" (what text-generation's chat client always sends),
"dummy" (what huggingface_hub's chat_completion sends without `model=`), "" or no model mean the base
model; an adapter id means that adapter, loaded on first use as for `adapter_id` on the TGI routes; a name
that resolves nowhere is a 404 in OpenAI's error envelope (code `model_not_found`), other adapter errors
keep their status (router/errors.py). TGI instead serves the base model for unknown names. A top-level
`adapter_id` (what openai's and huggingface_hub's `extra_body` carry) picks the adapter as well; with a
`model` that names another adapter it is a 422. Responses echo the adapter id, or the base model's id.

The request becomes a TGI GenerateRequest and goes through the same validation: the chat route renders
the model's chat template (router/chat_template.py) and tokenizes it without adding special tokens; the
completions route uses each prompt as given. Sampling follows TGI's mapping: `temperature: 0` is greedy,
anything else (OpenAI's default is 1) samples, with a random seed unless `seed` is set; `top_p: 1` means
no nucleus filter (TGI would refuse it). `max_tokens` defaults to what fits the context on chat (as
OpenAI does) and to 16 on completions (OpenAI's legacy default). `frequency_penalty` is applied;
`presence_penalty`, `logit_bias`, `n` != 1, tools, response formats other than text, `echo` and
`suffix` are refused with a 422 naming the parameter. Unlike TGI, a stop sequence is left out of the
returned text, as OpenAI leaves it out.

Parameters are mapped and refused in router/openai_params.py, streams written in router/openai_stream.py.
Errors before a stream starts are JSON in OpenAI's envelope, which also carries TGI's `error_type`.
"""

from __future__ import annotations

import functools
import time
import uuid

from aiohttp import web

from router import chat_template, lifecycle, openai_params, openai_stream
from router.adapter_resolver import AdapterNotFoundError
from router.adapters import AdapterLease
from router.auth import request_tenant
from router.errors import ADAPTER_ERRORS, ApiError, adapter_error
from router.http_common import read_json, server_version, timing_headers
from router.metrics import RequestRecord
from router.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelNotFoundError,
    OpenAIError,
    ResponseContext,
    chat_logprob_json,
    completion_logprobs_json,
    error_json,
    finish_reason,
    output_text,
    usage_json,
    visible_tokens,
)
from router.openapi import Handler
from router.schemas import GenerateRequest
from router.state import STATE, State
from router.stream import dumps

# The model names that mean the base model, besides its own id: text-generation's fixed chat model and
# huggingface_hub's placeholder when chat_completion gets no `model=`.
BASE_MODEL_ALIASES = ("", "tgi", "dummy")


def openai_errors(handler: Handler) -> Handler:
    """Errors raised before a response started leave in OpenAI's envelope."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(error_json(e), status=e.status, dumps=dumps)

    return wrapped


@openai_errors
async def models(request: web.Request) -> web.Response:
    """`GET /v1/models`: the base model, then every adapter loaded (`parent` = the base model)."""
    state = request.app[STATE]
    base = state.config.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": base, "parent": None}]
    data += [
        {"id": a.name, "object": "model", "created": 0, "owned_by": base, "parent": base}
        for a in state.adapters.loaded()
    ]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


@openai_errors
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`: the chat template over `messages`, then one generation."""
    state = request.app[STATE]
    with lifecycle.admitted(state, request_tenant(request)) as record:
        body = await read_json(request, ChatCompletionRequest)
        start = time.monotonic()
        model, adapter = await resolve_model(state, record, body.model, body.adapter_id)
        top_n = openai_params.chat_top_n(body, state.limits.max_top_n_tokens)
        template = chat_template.load(state.config.model_dir)
        prompt = template.render([openai_params.template_message(m) for m in body.messages])
        params = openai_params.parameters(body, body.max_completion_tokens or body.max_tokens, top_n)
        bodies = [GenerateRequest(inputs=prompt, parameters=params)]
        ctx = _context("chatcmpl", model, body.stop)
        async with lifecycle.submitted(
            state, record, bodies, adapter, stream=body.stream, add_special_tokens=False
        ) as submission:
            if body.stream:
                return await openai_stream.chat_stream(request, state, body, submission, ctx, start)
            ((best, _),) = await submission.results()
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [chat_logprob_json(t, top) for t, top in visible_tokens(best)]}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": output_text(best, ctx.stops)},
            "logprobs": logprobs,
            "finish_reason": finish_reason(best.finish_reason),
        }
        payload = {
            **ctx.header("chat.completion"),
            "choices": [choice],
            "usage": usage_json(best.prompt_tokens, best.generated_tokens),
        }
        headers = timing_headers(state, prompt, best, start, submission.validated_at)
        return web.json_response(payload, headers=headers, dumps=dumps)


@openai_errors
async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: each prompt (up to MAX_CLIENT_BATCH_SIZE) is one choice."""
    state = request.app[STATE]
    with lifecycle.admitted(state, request_tenant(request)) as record:
        body = await read_json(request, CompletionRequest)
        start = time.monotonic()
        model, adapter = await resolve_model(state, record, body.model, body.adapter_id)
        prompts, top_n = openai_params.completion_prompts(body, state.limits.max_top_n_tokens)
        max_tokens = openai_params.COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = openai_params.parameters(body, max_tokens, top_n)
        bodies = [GenerateRequest(inputs=p, parameters=params) for p in prompts]
        ctx = _context("cmpl", model, body.stop)
        async with lifecycle.submitted(state, record, bodies, adapter, stream=body.stream) as submission:
            if body.stream:
                return await openai_stream.completions_stream(request, state, body, submission, ctx, start)
            results = [best for best, _ in await submission.results()]
        choices = []
        for i, r in enumerate(results):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs_json(visible_tokens(r))
            choices.append(
                {
                    "index": i,
                    "text": output_text(r, ctx.stops),
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(r.finish_reason),
                }
            )
        prompt_tokens = sum(r.prompt_tokens for r in results)
        generated = sum(r.generated_tokens for r in results)
        payload = {
            **ctx.header("text_completion"),
            "choices": choices,
            "usage": usage_json(prompt_tokens, generated),
        }
        headers = timing_headers(state, "".join(prompts), results[0], start, submission.validated_at)
        headers |= {"x-prompt-tokens": str(prompt_tokens), "x-generated-tokens": str(generated)}
        return web.json_response(payload, headers=headers, dumps=dumps)


async def resolve_model(
    state: State, record: RequestRecord, model: str | None, adapter_id: str | None = None
) -> tuple[str, AdapterLease | None]:
    """(the model name responses echo, the adapter to run: None for the base model); ModelNotFoundError
    for names that resolve nowhere, the adapter's other errors in OpenAI's envelope."""
    base = state.config.model_id
    param = "model"
    if adapter_id is not None:
        if model is not None and model not in BASE_MODEL_ALIASES and model not in (base, adapter_id):
            raise OpenAIError(
                f"`model` `{model}` and `adapter_id` `{adapter_id}` name different adapters", "adapter_id"
            )
        model, param = adapter_id, "adapter_id"
    if model is None or model in BASE_MODEL_ALIASES:
        model = None
    try:
        adapter = await lifecycle.resolve_adapter(state, record, model)
    except AdapterNotFoundError as e:
        raise ModelNotFoundError(str(model), param, detail=str(e)) from None
    except ADAPTER_ERRORS as e:
        error = adapter_error(e, "request")
        openai = OpenAIError(error.message, param, status=error.status, code=error.error_type)
        openai.error_type = error.error_type
        raise openai from None
    return (base, None) if adapter is None else (adapter.id, adapter)


def _context(prefix: str, model: str, stop: str | list[str] | None) -> ResponseContext:
    return ResponseContext(
        f"{prefix}-{uuid.uuid4().hex}",
        int(time.time()),
        model,
        openai_params.stops(stop),
        f"{server_version()}-native",
    )
