"""The public gRPC API (proto/public.proto) on `RouterConfig.grpc_port`, served next to the HTTP app.

A request takes HTTP's path: API key, the concurrency limit shared with HTTP, the same pydantic
GenerateRequest (finite numbers only: a double may be NaN or infinite) and request lifecycle
(router/lifecycle.py), and the same metrics. Errors are the HTTP errors turned into status codes (table
in public.proto), with the same messages. The server starts once the router's state is up. At shutdown it
stops taking calls when HTTP stops taking requests (`grpc_drain`, an on_shutdown hook), and the calls in
flight get the same `shutdown_timeout_s` as HTTP's requests, at the same time; the scheduler stops after
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError as PydanticValidationError

from proto import public_pb2 as pb
from proto import public_pb2_grpc
from router import adapter_api, lifecycle, stream
from router.adapter_registry import AdapterRegistry
from router.auth import tenant_for
from router.client import ShardedClient, WorkerError
from router.config import RouterConfig
from router.errors import (
    AdapterCapacityApiError,
    AdapterDownloadApiError,
    AdapterExistsApiError,
    AdapterLoadApiError,
    AdapterNotLoadedError,
    ApiError,
    BadRequestError,
    BodyError,
    NotFoundError,
    OverloadedError,
    UnauthorizedError,
    ValidationError,
)
from router.schemas import GenerateRequest, problems
from router.sequence import FinishReason, GenerationResult, Token
from router.state import CONFIG, STATE, State
from router.validation import ValidRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
GRPC_PORT = web.AppKey("grpc_port", int)
"""The port the public gRPC server listens on (differs from the config's when that is 0)."""


@dataclass
class _Drain:
    """Stops the server once: no new calls, `grace_s` for the calls in flight, then they are cancelled."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    grace_s: float
    task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        if self.task is None:
            self.task = asyncio.ensure_future(self._stop())
        return self.task

    async def _stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=self.grace_s)


GRPC_DRAIN = web.AppKey("grpc_drain", _Drain)
HEALTH_TIMEOUT_S = 5.0

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}


def status_code(e: ApiError) -> grpc.StatusCode:
    if isinstance(e, AdapterNotLoadedError | NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, AdapterExistsApiError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(e, AdapterLoadApiError) and e.refused:
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, ValidationError | BodyError | BadRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, AdapterDownloadApiError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(e, OverloadedError | AdapterCapacityApiError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, UnauthorizedError):
        return grpc.StatusCode.UNAUTHENTICATED
    if e.status == 501:
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


class TextGenerationServicer(public_pb2_grpc.TextGenerationServicer):
    def __init__(self, state: State):
        self.state = state

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        """HTTP `POST /generate`: one response once generation ends."""
        state = self.state
        try:
            tenant = _check_key(context, state.config)
            with lifecycle.admitted(state, tenant) as record:
                body = to_generate_request(request)
                async with lifecycle.tgi_submitted(state, record, body) as submission:
                    ((best, others),) = await submission.results()
                return generate_response(submission.requests[0], best, others)
        except Exception as e:
            await _abort(context, e)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """HTTP `POST /generate_stream`: one response per token, the last with the text and details."""
        state = self.state
        try:
            tenant = _check_key(context, state.config)
            with lifecycle.admitted(state, tenant) as record:
                body = to_generate_request(request)
                async with lifecycle.tgi_submitted(state, record, body, stream=True) as submission:
                    (valid,), (seq,) = submission.requests, submission.sequences
                    async with contextlib.aclosing(stream.steps(seq, None)) as steps:
                        async for step in steps:
                            assert step is not None  # no keep-alives without a timeout
                            yield stream_response(valid, step)
                            if step.end is not None:
                                record.succeeded(step.end)
        except Exception as e:
            await _abort(context, e)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        """HTTP `POST /v1/load_lora_adapter`: register an adapter and load it now."""

        async def load(registry: AdapterRegistry) -> pb.LoadAdapterResponse:
            entry = await adapter_api.load(registry, request.lora_name, request.lora_path, request.pinned)
            return pb.LoadAdapterResponse(adapter=adapter_api.adapter_message(registry, entry))

        return await self._adapters(context, load)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        """HTTP `POST /v1/unload_lora_adapter`: unroutable now, its memory freed after its requests."""

        async def unload(registry: AdapterRegistry) -> pb.UnloadAdapterResponse:
            await adapter_api.unload(registry, request.lora_name)
            return pb.UnloadAdapterResponse()

        return await self._adapters(context, unload)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        """HTTP `GET /v1/adapters`."""

        async def listed(registry: AdapterRegistry) -> pb.ListAdaptersResponse:
            adapters = [adapter_api.adapter_message(registry, e) for e in registry.entries()]
            return pb.ListAdaptersResponse(adapters=adapters)

        return await self._adapters(context, listed)

    async def _adapters(self, context, work: Callable[[AdapterRegistry], Awaitable[T]]) -> T:
        """`work` on the adapter registry, behind the API key; its errors as status codes."""
        try:
            _check_key(context, self.state.config)
            return await work(self.state.adapters)
        except Exception as e:
            await _abort(context, e)


class WorkerHealth(health.aio.HealthServicer):
    """grpc.health.v1: for "" and the public service, SERVING when every worker rank answers Health (as
    GET /health does), NOT_SERVING otherwise and once shutting down."""

    def __init__(self, client: ShardedClient):
        super().__init__()
        self._client = client

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        reply = await super().Check(request, context)
        if reply.status == health_pb2.HealthCheckResponse.SERVING and request.service in ("", SERVICE_NAME):
            try:
                await self._client.health(timeout=HEALTH_TIMEOUT_S)
            except WorkerError:
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return reply


async def grpc_serving(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: the public gRPC server, after the router's state is up (see app.py)."""
    config, state = app[CONFIG], app[STATE]
    assert config.grpc_port is not None
    options = [
        ("grpc.max_receive_message_length", config.payload_limit),
        # gRPC shares ports by default (SO_REUSEPORT): a second router would silently take half the calls.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    public_pb2_grpc.add_TextGenerationServicer_to_server(TextGenerationServicer(state), server)
    checker = WorkerHealth(state.client)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    address = f"{config.hostname}:{config.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises when it cannot bind
        raise OSError(f"the public gRPC API cannot listen on {address}: {e}") from None
    await server.start()
    for service in ("", SERVICE_NAME):
        await checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    app[GRPC_PORT] = port
    app[GRPC_DRAIN] = drain = _Drain(server, checker, config.shutdown_timeout_s)
    log.info("Public gRPC API listening on %s:%d", config.hostname, port)
    try:
        yield
    finally:
        await drain.start()  # started by grpc_drain already, unless startup failed after this context


async def grpc_drain(app: web.Application) -> None:
    """An on_shutdown hook: start draining the gRPC calls while aiohttp drains the HTTP requests (it
    waits for those after on_shutdown, and leaves the cleanup contexts only then)."""
    if GRPC_DRAIN in app:
        app[GRPC_DRAIN].start()


# ---- conversions ---------------------------------------------------------------------------------


def to_generate_request(request: pb.GenerateRequest) -> GenerateRequest:
    """The HTTP body the message stands for: only the fields it sets, so HTTP's defaults apply."""
    data: dict = {"inputs": request.inputs}
    if request.HasField("parameters"):
        p = request.parameters
        # Set fields only (an unset optional field takes HTTP's default); `stop` is the one repeated field.
        params = {f.name: value for f, value in p.ListFields()}
        params["stop"] = list(p.stop)
        data["parameters"] = params
    try:
        return GenerateRequest.model_validate(data)
    except PydanticValidationError as e:  # the model constrains more than the message types do (NaN)
        raise BodyError(f"Failed to deserialize the request: {problems(e)}", 422) from None


def _token(t: Token) -> pb.Token:
    logprob = t.logprob if t.logprob is not None and math.isfinite(t.logprob) else None
    return pb.Token(id=t.id, text=t.text, logprob=logprob, special=t.special)


def _details(r: GenerationResult, prefill: bool) -> pb.Details:
    return pb.Details(
        finish_reason=_FINISH[r.finish_reason],
        generated_tokens=r.generated_tokens,
        seed=r.seed,
        prompt_tokens=r.prompt_tokens,
        prefill=[_token(t) for t in r.prefill] if prefill else [],
        tokens=[_token(t) for t in r.tokens],
        top_tokens=[pb.TopTokens(tokens=[_token(t) for t in top]) for top in r.top_tokens]
        if any(r.top_tokens)
        else [],
    )


def generate_response(
    valid: ValidRequest, best: GenerationResult, others: list[GenerationResult]
) -> pb.GenerateResponse:
    """HTTP's GenerateResponse as a message (router/schemas.py `generate_response_json`)."""
    prefix = valid.inputs if valid.return_full_text else ""
    out = pb.GenerateResponse(generated_text=prefix + best.generated_text)
    if valid.details:
        out.details.CopyFrom(_details(best, valid.decoder_input_details))
        out.best_of_sequences.extend(
            pb.BestOfSequence(
                generated_text=prefix + r.generated_text, details=_details(r, valid.decoder_input_details)
            )
            for r in others
        )
    return out


def stream_response(valid: ValidRequest, step: stream.Step) -> pb.GenerateStreamResponse:
    t = step.token
    out = pb.GenerateStreamResponse(
        index=t.index + 1, token=_token(t.token), top_tokens=[_token(x) for x in t.top_tokens]
    )
    if (r := step.end) is not None:
        out.generated_text = (valid.inputs if valid.return_full_text else "") + r.generated_text
        if valid.details:
            out.details.CopyFrom(
                pb.StreamDetails(
                    finish_reason=_FINISH[r.finish_reason],
                    generated_tokens=r.generated_tokens,
                    seed=r.seed,
                    input_length=r.prompt_tokens,
                )
            )
    return out


# ---- errors and auth -----------------------------------------------------------------------------


def _check_key(context, config: RouterConfig) -> str | None:
    """The tenant whose key the call carries (None: the server has no keys); UnauthorizedError if none."""
    keys = config.tenant_keys()
    if not keys:
        return None
    tenant = tenant_for(dict(context.invocation_metadata() or ()).get("authorization"), keys)
    if tenant is None:
        raise UnauthorizedError()
    return tenant


async def _abort(context, e: Exception) -> NoReturn:
    """End the call with the status for `e` (HTTP's message; `error-type` in the trailing metadata)."""
    if not isinstance(e, ApiError):
        log.error("public gRPC call failed", exc_info=e)
        e = ApiError("Internal server error")
    await context.abort(status_code(e), e.message, trailing_metadata=(("error-type", e.error_type),))
    raise AssertionError("context.abort returned")
