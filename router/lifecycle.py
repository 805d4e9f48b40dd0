"""A generation request's lifecycle, the one every generation route and RPC goes through:

    admitted -> resolve_adapter -> submitted (validate, record, submit with seeds) -> read -> cancel

`admitted` opens the request's metrics record inside the concurrency limit. `resolve_adapter` is the one
place a request's adapter id becomes an adapter and its slot, once per request; the validated request
carries the result (`ValidRequest.adapter`). `submitted` validates, records and submits, and on leaving
cancels whatever is still queued or running (the client went away, a stream was cut, an error); its
`Submission` is then streamed (router/stream.py) or collected (`Submission.results`). TGI's bodies name
their adapter in `parameters.adapter_id` (`tgi_submitted`); the OpenAI routes resolve theirs from
`model` first and pass it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from proto import generate_pb2 as pb
from router.adapters import AdapterInfo, UnknownAdapterError
from router.errors import AdapterNotLoadedError
from router.metrics import RequestRecord
from router.schemas import GenerateRequest
from router.sequence import EndEvent, ErrorEvent, GenerationResult, Sequence, SequenceParams
from router.state import State
from router.validation import ValidRequest

_U64 = 2**64


@contextlib.contextmanager
def admitted(state: State) -> Iterator[RequestRecord]:
    """The request's metrics record, inside `max_concurrent_requests` (full: 429, counted as a failure)."""
    with state.metrics.request() as record, state.concurrency.acquire():
        yield record


async def resolve_adapter(state: State, record: RequestRecord, adapter_id: str | None) -> AdapterInfo | None:
    """The adapter `adapter_id` names (None: the base model), which then labels `record`'s metrics.

    Raises UnknownAdapterError. A coroutine, so that resolving may wait (for an adapter to load) without
    its callers changing."""
    adapter = state.adapters.find(adapter_id)
    record.resolved(adapter)
    return adapter


@dataclass(frozen=True)
class Submission:
    """Validated requests and their sequences: each request's `best_of` in a row, in request order (one
    per request when streaming, where validation allows no best_of)."""

    record: RequestRecord
    requests: list[ValidRequest]
    sequences: list[Sequence]
    validated_at: float

    async def results(self) -> list[tuple[GenerationResult, list[GenerationResult]]]:
        """Each request's best result and its other best_of results once every sequence has ended,
        recorded as successes; raises the first error."""
        tasks = [asyncio.ensure_future(_collect(seq)) for seq in self.sequences]
        try:
            ended = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        out = []
        for request in self.requests:
            mine, ended = ended[: request.best_of], ended[request.best_of :]
            best = max(range(len(mine)), key=lambda i: mine[i].mean_logprob)
            out.append((mine[best], [r for i, r in enumerate(mine) if i != best]))
            self.record.succeeded(mine[best])
        return out


@contextlib.asynccontextmanager
async def submitted(
    state: State,
    record: RequestRecord,
    bodies: Seq[GenerateRequest],
    adapter: AdapterInfo | None,
    *,
    stream: bool = False,
    add_special_tokens: bool = True,
) -> AsyncIterator[Submission]:
    """Validate every body for `adapter` before submitting any, record them, submit each `best_of` times
    (a sampling request without a seed gets a random one per sequence, echoed in details); on leaving,
    cancel the sequences that have not ended."""
    validator = state.validator
    requests = [
        validator.validate(b, adapter, stream=stream, add_special_tokens=add_special_tokens) for b in bodies
    ]
    for request in requests:
        record.validated(request)
    validated_at = time.monotonic()
    seqs = [state.scheduler.submit(_seeded(r)) for r in requests for _ in range(r.best_of)]
    try:
        yield Submission(record, requests, seqs, validated_at)
    finally:
        for seq in seqs:
            state.scheduler.cancel(seq)


@contextlib.asynccontextmanager
async def tgi_submitted(
    state: State, record: RequestRecord, body: GenerateRequest, *, stream: bool = False
) -> AsyncIterator[Submission]:
    """`submitted` for one TGI body, its adapter named by `parameters.adapter_id`. An unknown id is a 422
    only once the body passes every other check: a body that fails one gets that check's message, in
    TGI's order (router/validation.py)."""
    adapter_id = body.parameters.adapter_id
    try:
        adapter, found = await resolve_adapter(state, record, adapter_id), True
    except UnknownAdapterError:
        adapter, found = None, False
    if not found:
        state.validator.validate(body, None, stream=stream)
        raise AdapterNotLoadedError(
            f"adapter `{adapter_id}` is not loaded; `GET /info` lists the loaded adapters"
        )
    async with submitted(state, record, [body], adapter, stream=stream) as submission:
        yield submission


def _seeded(request: ValidRequest) -> SequenceParams:
    params = request.params
    if not params.sampling.do_sample or request.seed is not None:
        return params
    sampling = pb.SamplingParameters()
    sampling.CopyFrom(params.sampling)
    sampling.seed = secrets.randbelow(_U64)
    return dataclasses.replace(params, sampling=sampling)


async def _collect(seq: Sequence) -> GenerationResult:
    """Wait for a sequence's end; its token events are skipped (the result repeats them)."""
    while True:
        event = await seq.events.get()
        if isinstance(event, EndEvent):
            return event.result
        if isinstance(event, ErrorEvent):
            raise event.error
