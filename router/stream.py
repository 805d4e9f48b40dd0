"""Server-sent events: the framing, a sequence's tokens as stream steps, and TGI's `/generate_stream`.

Framing (TGI's, which is axum's `Event::json_data`): each event is `data:<json>` and a blank line, with
no space after the colon, and nothing after the last event (no `data: [DONE]`: text-generation and
lorax-client fail on it). The OpenAI routes frame events as OpenAI does, `data: <json>`, and end with
`data: [DONE]` unless text-generation's chat client asks (router/openai_stream.py). A stream idle for
`KEEPALIVE_S` gets a comment line (`:`), as axum's default keep-alive sends, so proxies and clients do
not time out while a request waits.

A stream's status and headers leave once the request is validated: validation errors are plain JSON
errors with their status codes; errors after that (a failed generation) arrive as one last event,
`data:{"error": ..., "error_type": ...}`. A client that goes away cancels its sequence, whose KV blocks
are freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from router import lifecycle
from router.errors import ApiError
from router.http_common import stream_headers
from router.metrics import RequestRecord
from router.schemas import GenerateRequest, token_json
from router.sequence import EndEvent, ErrorEvent, GenerationResult, PrefillEvent, Sequence, TokenEvent
from router.state import State

# axum's default keep-alive interval, which TGI's streams use.
KEEPALIVE_S = 15.0
KEEPALIVE = b":\n\n"

# Compact, as serde_json writes it.
dumps = functools.partial(json.dumps, allow_nan=False, separators=(",", ":"))


def sse_event(data: str, *, space: bool = False) -> bytes:
    """One event: a `data:` line per line of `data`, then a blank line."""
    prefix = "data: " if space else "data:"
    return ("".join(f"{prefix}{line}\n" for line in data.split("\n")) + "\n").encode()


async def open_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """A 200 `text/event-stream` response, its headers sent."""
    resp = web.StreamResponse(
        status=200,
        headers={hdrs.CONTENT_TYPE: "text/event-stream", hdrs.CACHE_CONTROL: "no-cache", **headers},
    )
    await resp.prepare(request)
    return resp


@dataclass(frozen=True)
class Step:
    """One generated token; `end` is the sequence's result when it is the last one."""

    token: TokenEvent
    end: GenerationResult | None = None


async def steps(seq: Sequence, keepalive_s: float | None) -> AsyncIterator[Step | None]:
    """`seq`'s tokens as they come, the last one with the result; None after `keepalive_s` of silence.

    Raises the sequence's error. The scheduler queues a sequence's last TokenEvent and its EndEvent in
    the same step, so looking one event ahead never delays a token.
    """
    pending: Any = None
    while True:
        event, pending = pending, None
        if event is None:
            try:
                async with asyncio.timeout(keepalive_s):
                    event = await seq.events.get()
            except TimeoutError:
                yield None
                continue
        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, PrefillEvent):
            continue
        if isinstance(event, EndEvent):  # an end without a token: nothing more to send
            return
        if not seq.events.empty():
            pending = seq.events.get_nowait()
            if isinstance(pending, EndEvent):
                yield Step(event, pending.result)
                return
        yield Step(event)


async def tagged_steps(
    seqs: list[Sequence], keepalive_s: float | None
) -> AsyncIterator[tuple[int, Step] | None]:
    """The steps of several sequences as they come, each with its sequence's position; None on silence.

    Raises the first error of any of them.
    """
    if len(seqs) == 1:
        async with contextlib.aclosing(steps(seqs[0], keepalive_s)) as it:
            async for step in it:
                yield None if step is None else (0, step)
        return
    merged: asyncio.Queue[tuple[int, Step | ApiError | None]] = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        try:
            async for step in steps(seq, None):
                merged.put_nowait((i, step))
            merged.put_nowait((i, None))
        except ApiError as e:
            merged.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
    try:
        running = len(seqs)
        while running:
            try:
                async with asyncio.timeout(keepalive_s):
                    i, item = await merged.get()
            except TimeoutError:
                yield None
                continue
            if isinstance(item, ApiError):
                raise item
            if item is None:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def write_stream(
    resp: web.StreamResponse,
    items: AsyncIterator[tuple[int, Step] | None],
    record: RequestRecord,
    event: Callable[[int, Step], bytes],
    error: Callable[[ApiError], bytes],
    trailer: bytes = b"",
) -> None:
    """Write `event(i, step)` per step and keep-alives while idle, or `error(e)` once generation fails;
    then `trailer` and the end of the body. Reports each end, the failure or the disconnect to `record`.
    """
    try:
        try:
            async with contextlib.aclosing(items) as it:
                async for item in it:
                    if item is None:
                        await resp.write(KEEPALIVE)
                        continue
                    i, step = item
                    await resp.write(event(i, step))
                    if step.end is not None:
                        record.succeeded(step.end)
        except ApiError as e:
            record.failed(e.error_type)
            await resp.write(error(e))
        if trailer:
            await resp.write(trailer)
        await resp.write_eof()
    except ConnectionResetError:  # the client went away; the caller cancels its sequences
        record.failed("dropped")


# ---- TGI's /generate_stream ------------------------------------------------------------------


def tgi_event(step: Step, *, details: bool, prefix: str) -> bytes:
    """TGI's StreamResponse: every token; the last one adds `generated_text` and (if asked) `details`.

    `index` counts tokens from 1, as TGI's does. `details` adds lorax-client's `prompt_tokens` to TGI's
    `input_length`.
    """
    t = step.token
    out: dict[str, Any] = {"index": t.index + 1, "token": token_json(t.token)}
    if t.top_tokens:
        out["top_tokens"] = [token_json(x) for x in t.top_tokens]
    out["generated_text"] = None
    out["details"] = None
    if (r := step.end) is not None:
        out["generated_text"] = prefix + r.generated_text
        if details:
            out["details"] = {
                "finish_reason": r.finish_reason.value,
                "generated_tokens": r.generated_tokens,
                "seed": r.seed,
                "input_length": r.prompt_tokens,
                "prompt_tokens": r.prompt_tokens,
            }
    return sse_event(dumps(out))


def tgi_error_event(e: ApiError) -> bytes:
    return sse_event(dumps({"error": e.message, "error_type": e.error_type}))


async def generate_stream(
    request: web.Request, state: State, body: GenerateRequest, record: RequestRecord
) -> web.StreamResponse:
    """Validate, then stream TGI's events for one sequence."""
    start = time.monotonic()
    async with lifecycle.tgi_submitted(state, record, body, stream=True) as submission:
        (valid,) = submission.requests
        prompt_tokens = len(valid.params.input_ids)
        headers = stream_headers(state, valid.inputs, prompt_tokens, start, submission.validated_at)
        resp = await open_stream(request, headers)
        prefix = valid.inputs if valid.return_full_text else ""

        def event(_: int, step: Step) -> bytes:
            return tgi_event(step, details=valid.details, prefix=prefix)

        steps = tagged_steps(submission.sequences, KEEPALIVE_S)
        await write_stream(resp, steps, record, event, tgi_error_event)
        return resp
