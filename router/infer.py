"""Run a request: validate it, then one sequence or `best_of` of them, with seeds chosen here.

`run` is the path every non-streaming route and RPC shares: validation, metrics, generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

from router.metrics import RequestRecord
from router.scheduler import Scheduler
from router.schemas import GenerateRequest
from router.sequence import EndEvent, ErrorEvent, GenerationResult, Sequence
from router.validation import Validator, ValidRequest

_U64 = 2**64


def with_seed(request: ValidRequest) -> ValidRequest:
    """A sampling request without a seed gets a random one (echoed in details)."""
    sampling = request.params.sampling
    if not sampling.do_sample or request.seed is not None:
        return request
    sampling = dataclasses.replace(sampling, seed=secrets.randbelow(_U64))
    return dataclasses.replace(request, params=dataclasses.replace(request.params, sampling=sampling))


async def collect(seq: Sequence) -> GenerationResult:
    """Wait for a sequence's end; its token events are skipped (the result repeats them)."""
    while True:
        event = await seq.events.get()
        if isinstance(event, EndEvent):
            return event.result
        if isinstance(event, ErrorEvent):
            raise event.error


async def generate(
    scheduler: Scheduler, request: ValidRequest
) -> tuple[GenerationResult, list[GenerationResult]]:
    """The best result and the other best_of results. Cancelling this cancels every sequence."""
    seqs = [scheduler.submit(with_seed(request).params) for _ in range(request.best_of)]
    try:
        results = await asyncio.gather(*(collect(s) for s in seqs))
    finally:
        for seq in seqs:
            scheduler.cancel(seq)
    best = max(range(len(results)), key=lambda i: results[i].mean_logprob)
    return results[best], [r for i, r in enumerate(results) if i != best]


async def run(
    validator: Validator, scheduler: Scheduler, body: GenerateRequest, record: RequestRecord
) -> tuple[ValidRequest, GenerationResult, list[GenerationResult]]:
    """Validate and generate, reporting to `record`: the request, the best result and the other best_of."""
    record.adapter_id = body.parameters.adapter_id
    valid = validator.validate(body)
    record.validated(valid)
    best, others = await generate(scheduler, valid)
    record.succeeded(best)
    return valid, best, others
