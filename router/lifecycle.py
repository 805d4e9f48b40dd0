"""A generation request's lifecycle, the one every generation route and RPC goes through:

    admitted -> resolve_adapter -> submitted (validate, record, submit with seeds) -> read -> cancel

`admitted` opens the request's metrics record inside the concurrency limit, and on leaving releases the
request's adapter lease. `resolve_adapter` is the one place a request's adapter id becomes an adapter:
a lease from the registry (router/adapter_registry.py), which may wait for the adapter to load; it
raises the registry's errors, which each route maps (router/errors.py `adapter_error`). `submitted`
validates, records and submits, each sequence with a lease of its own (the scheduler releases it when it
frees the sequence), and on leaving cancels whatever is still queued or running (the client went away, a
stream was cut, an error); its `Submission` is then streamed (router/stream.py) or collected
(`Submission.results`). TGI's bodies name their adapter in `parameters.adapter_id` (`tgi_submitted`,
which validates the body before resolving it, so a bad body never loads an adapter); the OpenAI routes
resolve theirs from `model` first and pass it in.
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
from router.adapters import AdapterLease
from router.errors import ADAPTER_ERRORS, adapter_error
from router.metrics import RequestRecord
from router.schemas import GenerateRequest
from router.sequence import EndEvent, ErrorEvent, GenerationResult, Sequence, SequenceParams
from router.state import State
from router.validation import ValidRequest

_U64 = 2**64


@contextlib.contextmanager
def admitted(state: State, tenant: str | None = None) -> Iterator[RequestRecord]:
    """The request's metrics record, inside `max_concurrent_requests` (full: 429, counted as a failure),
    for `tenant` (whose key it carried: router/auth.py); on leaving, the request's own adapter lease is
    released (its sequences hold their own)."""
    with state.metrics.request() as record, state.concurrency.acquire():
        record.tenant = tenant
        try:
            yield record
        finally:
            if record.lease is not None:
                record.lease.release()


async def resolve_adapter(
    state: State, record: RequestRecord, adapter_id: str | None, source: str | None = None
) -> AdapterLease | None:
    """A lease on the adapter `adapter_id` names (None: the base model), which then labels `record`'s
    metrics and is released when the request ends (`admitted`).

    Waits while the adapter loads; raises the registry's errors (`ADAPTER_ERRORS`)."""
    lease = await state.adapters.acquire(adapter_id, source)
    record.resolved(lease)
    return lease


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
    adapter: AdapterLease | None,
    *,
    stream: bool = False,
    add_special_tokens: bool = True,
) -> AsyncIterator[Submission]:
    """Validate every body before submitting any, then `_submission`."""
    validator = state.validator
    requests = [validator.validate(b, stream=stream, add_special_tokens=add_special_tokens) for b in bodies]
    async with _submission(state, record, requests, adapter) as submission:
        yield submission


@contextlib.asynccontextmanager
async def tgi_submitted(
    state: State, record: RequestRecord, body: GenerateRequest, *, stream: bool = False
) -> AsyncIterator[Submission]:
    """`submitted` for one TGI body, its adapter named by `parameters.adapter_id` (and lorax's
    `adapter_source`). The body is validated first: one that fails a check gets that check's message,
    in TGI's order (router/validation.py), and loads nothing; then the adapter errors (a 422 for an id
    that resolves nowhere)."""
    params, adapters = body.parameters, state.adapters
    # A body that fails validation counts against the adapter it names, when that one is known.
    if adapters.is_base(params.adapter_id):
        record.label(None)
    elif adapters.registered(params.adapter_id):
        record.label(params.adapter_id)
    request = state.validator.validate(body, stream=stream)
    try:
        adapter = await resolve_adapter(state, record, params.adapter_id, params.adapter_source)
    except ADAPTER_ERRORS as e:
        raise adapter_error(e, "request") from None
    async with _submission(state, record, [request], adapter) as submission:
        yield submission


@contextlib.asynccontextmanager
async def _submission(
    state: State, record: RequestRecord, requests: list[ValidRequest], adapter: AdapterLease | None
) -> AsyncIterator[Submission]:
    """Record `requests` and submit each `best_of` times for `adapter`, each sequence with its own lease
    (a sampling request without a seed gets a random one per sequence, echoed in details), all or none
    (the adapter's share of the queue full: 429); on leaving, cancel the sequences that have not ended."""
    for request in requests:
        record.validated(request)
    validated_at = time.monotonic()
    state.scheduler.check_room(adapter, sum(r.best_of for r in requests))
    seqs = [
        state.scheduler.submit(
            _seeded(r, adapter), None if adapter is None else adapter.clone(), record.tenant
        )
        for r in requests
        for _ in range(r.best_of)
    ]
    if adapter is not None:
        adapter.release()  # the sequences hold it now
    try:
        yield Submission(record, requests, seqs, validated_at)
    finally:
        for seq in seqs:
            state.scheduler.cancel(seq)


def _seeded(request: ValidRequest, adapter: AdapterLease | None) -> SequenceParams:
    """The sequence's parameters: the adapter's slot and load generation, and a seed if it samples."""
    params = request.params
    if adapter is not None:
        params = dataclasses.replace(params, lora_slot=adapter.slot, adapter_generation=adapter.generation)
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
