"""OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

`model` picks the adapter: the base model's id, "tgi" (what text-generation's chat client always sends),
"dummy" (what huggingface_hub's chat_completion sends without `model=`), "" or no model mean the base
model; an adapter id means that adapter; any other name is a 404 in OpenAI's error envelope (code
`model_not_found`). TGI instead serves the base model for unknown names. A top-level `adapter_id` (what
openai's and huggingface_hub's `extra_body` carry) picks the adapter as well; with a `model` that names
another adapter it is a 422. Responses echo the adapter id, or the base model's id.

The request becomes a TGI GenerateRequest and goes through the same validation: the chat route renders
the model's chat template (router/chat_template.py) and tokenizes it without adding special tokens; the
completions route uses each prompt as given. Sampling follows TGI's mapping: `temperature: 0` is greedy,
anything else (OpenAI's default is 1) samples, with a random seed unless `seed` is set; `top_p: 1` means
no nucleus filter (TGI would refuse it). `max_tokens` defaults to what fits the context on chat (as
OpenAI does) and to 16 on completions (OpenAI's legacy default). `frequency_penalty` is applied;
`presence_penalty`, `logit_bias`, `n` != 1, tools, response formats other than text, `echo` and
`suffix` are refused with a 422 naming the parameter. Unlike TGI, a stop sequence is left out of the
returned text, as OpenAI leaves it out.

Streams are OpenAI's: `data: <chunk>` events ending in a blank line, an optional usage chunk with
`choices: []` (`stream_options.include_usage`), then `data: [DONE]` (with the space, which
huggingface_hub needs), except for `model: "tgi"`: text-generation's chat client, which always sends
that name, parses every `data:` line as JSON and fails on `[DONE]`; openai and huggingface_hub also end
cleanly without it. Every chunk repeats `delta.role` and carries `delta.tool_calls: null`
(text-generation's chat client requires both). An error once streaming has started is one
`data: {"error": {...}}` event, then `[DONE]` (same rule). Errors before that are JSON in OpenAI's
envelope, which also carries TGI's `error_type`.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from router import chat_template, infer, stream
from router.adapters import UnknownAdapterError
from router.errors import ApiError
from router.http_common import read_json, server_version, stream_headers, timing_headers
from router.metrics import RequestRecord
from router.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelNotFoundError,
    OpenAIError,
    chat_logprob_json,
    completion_logprobs_json,
    error_json,
    finish_reason,
    output_text,
    stream_error_json,
    usage_json,
)
from router.schemas import GenerateParameters, GenerateRequest
from router.sequence import GenerationResult, Token
from router.state import STATE, State
from router.stream import Step, dumps, open_stream, sse_event, tagged_steps, write_stream
from router.validation import ValidRequest

# TGI's default --max-client-batch-size: prompts per /v1/completions call.
MAX_CLIENT_BATCH_SIZE = 4
# OpenAI's default max_tokens for the legacy completions endpoint.
COMPLETIONS_MAX_TOKENS = 16
# The model names that mean the base model, besides its own id: text-generation's fixed chat model and
# huggingface_hub's placeholder when chat_completion gets no `model=`.
BASE_MODEL_ALIASES = ("", "tgi", "dummy")
DONE = sse_event("[DONE]", space=True)
# text-generation's chat client sends this model name on every request and cannot parse `[DONE]`.
NO_DONE_MODEL = "tgi"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openai_errors(handler: Handler) -> Handler:
    """Errors raised before a response started leave in OpenAI's envelope."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(error_json(e), status=e.status, dumps=dumps)

    return wrapped


# ---- handlers ---------------------------------------------------------------------------------


@openai_errors
async def models(request: web.Request) -> web.Response:
    """`GET /v1/models`: the base model, then every adapter (`parent` = the base model)."""
    state = request.app[STATE]
    base = state.config.model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": base, "parent": None}]
    data += [
        {"id": a.id, "object": "model", "created": 0, "owned_by": base, "parent": base}
        for a in state.adapters.infos()
    ]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


@openai_errors
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`: the chat template over `messages`, then one generation."""
    state = request.app[STATE]
    with state.metrics.request() as record, state.concurrency.acquire():
        body = await read_json(request, ChatCompletionRequest)
        start = time.monotonic()
        model, adapter_id = resolve_model(state, body.model, body.adapter_id)
        record.adapter_id = adapter_id
        if body.tools:
            raise OpenAIError("tools are not supported by this server", "tools")
        if body.response_format is not None and body.response_format.get("type") != "text":
            raise OpenAIError('only `response_format: {"type": "text"}` is supported', "response_format")
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError("`top_logprobs` requires `logprobs: true`", "top_logprobs")
        top_n = _top_n(state, (body.top_logprobs or 0) if body.logprobs else 0, "top_logprobs")
        prompt = chat_template.load(state.config.model_dir).render([_message(m) for m in body.messages])
        params = _parameters(body, body.max_completion_tokens or body.max_tokens, top_n, adapter_id)
        valid = state.validator.validate(
            GenerateRequest(inputs=prompt, parameters=params), stream=body.stream, add_special_tokens=False
        )
        record.validated(valid)
        validated = time.monotonic()
        ctx = _Context(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, _stops(body.stop))
        if body.stream:
            return await _chat_stream(request, state, body, valid, record, ctx, start, validated)
        (best,) = await _generate_all(state, [valid])
        record.succeeded(best)
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [chat_logprob_json(t, top) for t, top in _visible_tokens(best)]}
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
        headers = timing_headers(state, valid.inputs, best, start, validated)
        return web.json_response(payload, headers=headers, dumps=dumps)


@openai_errors
async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: each prompt (up to MAX_CLIENT_BATCH_SIZE) is one choice."""
    state = request.app[STATE]
    with state.metrics.request() as record, state.concurrency.acquire():
        body = await read_json(request, CompletionRequest)
        start = time.monotonic()
        model, adapter_id = resolve_model(state, body.model, body.adapter_id)
        record.adapter_id = adapter_id
        if body.suffix is not None:
            raise OpenAIError(
                "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix"
            )
        if body.echo:
            raise OpenAIError("`echo` is not supported by this server", "echo")
        if body.best_of not in (None, 1):
            raise OpenAIError("`best_of` must be 1 on /v1/completions", "best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError("`prompt` cannot be an empty list", "prompt")
        if len(prompts) > MAX_CLIENT_BATCH_SIZE:
            raise OpenAIError(
                f"Number of prompts exceeds the maximum allowed batch size of {MAX_CLIENT_BATCH_SIZE}",
                "prompt",
            )
        top_n = _top_n(state, body.logprobs or 0, "logprobs")
        max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = _parameters(body, max_tokens, top_n, adapter_id)
        valids = [
            state.validator.validate(GenerateRequest(inputs=p, parameters=params), stream=body.stream)
            for p in prompts
        ]
        for valid in valids:
            record.validated(valid)
        validated = time.monotonic()
        ctx = _Context(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, _stops(body.stop))
        if body.stream:
            return await _completions_stream(request, state, body, valids, record, ctx, start, validated)
        results = await _generate_all(state, valids)
        for r in results:
            record.succeeded(r)
        choices = []
        for i, r in enumerate(results):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs_json(_visible_tokens(r))
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
        headers = timing_headers(state, "".join(prompts), results[0], start, validated)
        headers |= {"x-prompt-tokens": str(prompt_tokens), "x-generated-tokens": str(generated)}
        return web.json_response(payload, headers=headers, dumps=dumps)


# ---- streams ----------------------------------------------------------------------------------


async def _chat_stream(
    request: web.Request,
    state: State,
    body: ChatCompletionRequest,
    valid: ValidRequest,
    record: RequestRecord,
    ctx: _Context,
    start: float,
    validated: float,
) -> web.StreamResponse:
    seq = state.scheduler.submit(infer.with_seed(valid).params)
    try:
        headers = stream_headers(state, valid.inputs, len(valid.params.input_ids), start, validated)
        resp = await open_stream(request, headers)
        deltas = DeltaText(ctx.stops)

        def event(_: int, step: Step) -> bytes:
            t, end = step.token, step.end
            content = deltas.push(t.token) if end is None else deltas.finish(output_text(end, ctx.stops))
            logprobs = None
            if body.logprobs:
                visible = [] if t.token.special else [chat_logprob_json(t.token, t.top_tokens)]
                logprobs = {"content": visible}
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": content, "tool_calls": None},
                "logprobs": logprobs,
                "finish_reason": None if end is None else finish_reason(end.finish_reason),
            }
            chunk = {**ctx.header("chat.completion.chunk"), "choices": [choice]}
            if not body.include_usage:
                return _sse(chunk)
            out = _sse({**chunk, "usage": None})
            if end is not None:
                usage = usage_json(end.prompt_tokens, end.generated_tokens)
                out += _sse({**ctx.header("chat.completion.chunk"), "choices": [], "usage": usage})
            return out

        await write_stream(
            resp, tagged_steps([seq], stream.KEEPALIVE_S), record, event, _error_event, _trailer(body)
        )
        return resp
    finally:
        state.scheduler.cancel(seq)


async def _completions_stream(
    request: web.Request,
    state: State,
    body: CompletionRequest,
    valids: list[ValidRequest],
    record: RequestRecord,
    ctx: _Context,
    start: float,
    validated: float,
) -> web.StreamResponse:
    seqs = [state.scheduler.submit(infer.with_seed(v).params) for v in valids]
    try:
        prompt_tokens = sum(len(v.params.input_ids) for v in valids)
        headers = stream_headers(state, "".join(v.inputs for v in valids), prompt_tokens, start, validated)
        resp = await open_stream(request, headers)
        deltas = [DeltaText(ctx.stops) for _ in seqs]
        ends: list[GenerationResult] = []
        offsets = [0] * len(seqs)

        def event(i: int, step: Step) -> bytes:
            t, end = step.token, step.end
            text = deltas[i].push(t.token) if end is None else deltas[i].finish(output_text(end, ctx.stops))
            logprobs = None
            if body.logprobs is not None:
                visible = [] if t.token.special else [(t.token, t.top_tokens)]
                logprobs = completion_logprobs_json(visible, offsets[i])
                offsets[i] += sum(len(tok.text) for tok, _ in visible)
            choice = {
                "index": i,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": None if end is None else finish_reason(end.finish_reason),
            }
            chunk = {**ctx.header("text_completion"), "choices": [choice]}
            if not body.include_usage:
                return _sse(chunk)
            out = _sse({**chunk, "usage": None})
            if end is not None:
                ends.append(end)
                if len(ends) == len(seqs):
                    usage = usage_json(
                        sum(r.prompt_tokens for r in ends), sum(r.generated_tokens for r in ends)
                    )
                    out += _sse({**ctx.header("text_completion"), "choices": [], "usage": usage})
            return out

        await write_stream(
            resp, tagged_steps(seqs, stream.KEEPALIVE_S), record, event, _error_event, _trailer(body)
        )
        return resp
    finally:
        for seq in seqs:
            state.scheduler.cancel(seq)


class DeltaText:
    """The text a stream may send so far: the generated text, less any tail that could still turn out to
    start a stop sequence (the stop sequence is left out of OpenAI's output, so it must not be sent)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def push(self, token: Token) -> str:
        if not token.special:
            self.text += token.text
        upto = max(len(self.text) - self._held_back(), self.sent)
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def finish(self, final_text: str) -> str:
        """What is left of the final text (the stop sequence removed, held-back characters flushed)."""
        sent = self.text[: self.sent]
        out = final_text[len(sent) :] if final_text.startswith(sent) else ""
        self.text, self.sent = final_text, len(final_text)
        return out

    def _held_back(self) -> int:
        """The longest end of the text that is a proper prefix of a stop sequence."""
        for n in range(min(max((len(s) for s in self.stops), default=1) - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


# ---- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    id: str
    created: int
    model: str
    stops: list[str]

    def header(self, kind: str) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"{server_version()}-native",
        }


def resolve_model(state: State, model: str | None, adapter_id: str | None = None) -> tuple[str, str | None]:
    """(the model name responses echo, the adapter_id to run); ModelNotFoundError for unknown names."""
    base = state.config.model_id
    param = "model"
    if adapter_id is not None:
        if model is not None and model not in BASE_MODEL_ALIASES and model not in (base, adapter_id):
            raise OpenAIError(
                f"`model` `{model}` and `adapter_id` `{adapter_id}` name different adapters", "adapter_id"
            )
        model, param = adapter_id, "adapter_id"
    if model is None or model in BASE_MODEL_ALIASES or model == base:
        return base, None
    try:
        state.adapters.slot_for(model)
    except UnknownAdapterError:
        raise ModelNotFoundError(model, param) from None
    return model, model


def _parameters(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    top_n: int,
    adapter_id: str | None,
) -> GenerateParameters:
    if body.n not in (None, 1):
        raise OpenAIError("`n` must be 1: this server returns one choice per prompt", "n")
    if body.presence_penalty:
        raise OpenAIError("`presence_penalty` is not supported by this server", "presence_penalty")
    if body.logit_bias:
        raise OpenAIError("`logit_bias` is not supported by this server", "logit_bias")
    if max_tokens is not None and max_tokens <= 0:
        raise OpenAIError("`max_tokens` must be strictly positive", "max_tokens")
    greedy = body.temperature == 0
    return GenerateParameters(
        adapter_id=adapter_id,
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        top_p=None if body.top_p == 1.0 else body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        max_new_tokens=max_tokens,
        stop=_stops(body.stop),
        seed=body.seed,
        top_n_tokens=top_n,
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _top_n(state: State, n: int, param: str) -> int:
    limit = state.limits.max_top_n_tokens
    if not 0 <= n <= limit:
        raise OpenAIError(f"`{param}` must be >= 0 and <= {limit}. Given: {n}", param)
    return n


def _message(m: ChatMessage) -> dict:
    """A message as the template sees it; text content parts are joined into one string (as TGI does)."""
    out = m.model_dump()
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError("only text content parts are supported", "messages")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


def _visible_tokens(r: GenerationResult) -> list[tuple[Token, tuple[Token, ...]]]:
    """The generated tokens that are part of the text (not special ones such as EOS), with alternatives."""
    return [(t, top) for t, top in zip(r.tokens, r.top_tokens, strict=True) if not t.special]


async def _generate_all(state: State, valids: list[ValidRequest]) -> list[GenerationResult]:
    """Each request's result; one failure cancels the others."""
    tasks = [asyncio.ensure_future(infer.generate(state.scheduler, v)) for v in valids]
    try:
        return [best for best, _ in await asyncio.gather(*tasks)]
    finally:
        for task in tasks:
            task.cancel()


def _trailer(body: ChatCompletionRequest | CompletionRequest) -> bytes:
    """`data: [DONE]`, unless the request comes from text-generation's chat client (see the docstring)."""
    return b"" if body.model == NO_DONE_MODEL else DONE


def _sse(payload: dict) -> bytes:
    return sse_event(dumps(payload), space=True)


def _error_event(e: ApiError) -> bytes:
    return _sse(stream_error_json(e))
