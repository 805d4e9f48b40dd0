"""OpenAI's streams: chat and completion chunks as server-sent events, and the text each chunk may carry.

Events are `data: <chunk>` and a blank line, an optional usage chunk with `choices: []`
(`stream_options.include_usage`), then `data: [DONE]` (with the space, which huggingface_hub needs),
except for `model: "tgi"`: text-generation's chat client, which always sends that name, parses every
`data:` line as JSON and fails on `[DONE]`; openai and huggingface_hub also end cleanly without it.
Every chat chunk repeats `delta.role` and carries `delta.tool_calls: null` (text-generation's chat
client requires both). An error once streaming has started is one `data: {"error": {...}}` event, then
`[DONE]` (same rule). A stop sequence is never sent, not even in part (`DeltaText`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from router.errors import ApiError
from router.http_common import stream_headers
from router.lifecycle import Submission
from router.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseContext,
    chat_logprob_json,
    completion_logprobs_json,
    finish_reason,
    output_text,
    stream_error_json,
    usage_json,
)
from router.sequence import GenerationResult, Token
from router.state import State
from router.stream import KEEPALIVE_S, Step, dumps, open_stream, sse_event, tagged_steps, write_stream

DONE = sse_event("[DONE]", space=True)
# text-generation's chat client sends this model name on every request and cannot parse `[DONE]`.
NO_DONE_MODEL = "tgi"


async def chat_stream(
    request: web.Request,
    state: State,
    body: ChatCompletionRequest,
    submission: Submission,
    ctx: ResponseContext,
    start: float,
) -> web.StreamResponse:
    """A chat completion's chunks, one per token."""
    (valid,) = submission.requests
    prompt_tokens = len(valid.params.input_ids)
    headers = stream_headers(state, valid.inputs, prompt_tokens, start, submission.validated_at)
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
        usage = None if end is None else usage_json(end.prompt_tokens, end.generated_tokens)
        return _chunk(ctx, "chat.completion.chunk", choice, body.include_usage, usage)

    await _write(resp, submission, event, body)
    return resp


async def completions_stream(
    request: web.Request,
    state: State,
    body: CompletionRequest,
    submission: Submission,
    ctx: ResponseContext,
    start: float,
) -> web.StreamResponse:
    """A completion's chunks, one per token of any prompt; `choices[0].index` says which."""
    valids = submission.requests
    prompt_tokens = sum(len(v.params.input_ids) for v in valids)
    inputs = "".join(v.inputs for v in valids)
    resp = await open_stream(
        request, stream_headers(state, inputs, prompt_tokens, start, submission.validated_at)
    )
    deltas = [DeltaText(ctx.stops) for _ in valids]
    ends: list[GenerationResult] = []
    offsets = [0] * len(valids)

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
        usage = None
        if end is not None:
            ends.append(end)
            if len(ends) == len(valids):
                usage = usage_json(sum(r.prompt_tokens for r in ends), sum(r.generated_tokens for r in ends))
        return _chunk(ctx, "text_completion", choice, body.include_usage, usage)

    await _write(resp, submission, event, body)
    return resp


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


async def _write(
    resp: web.StreamResponse,
    submission: Submission,
    event: Callable[[int, Step], bytes],
    body: ChatCompletionRequest | CompletionRequest,
) -> None:
    """The submission's chunks, an error event if generation fails, and the trailer (see the docstring)."""
    trailer = b"" if body.model == NO_DONE_MODEL else DONE
    steps = tagged_steps(submission.sequences, KEEPALIVE_S)
    await write_stream(resp, steps, submission.record, event, _error_event, trailer)


def _chunk(ctx: ResponseContext, kind: str, choice: dict, include_usage: bool, usage: dict | None) -> bytes:
    """A chunk of one choice. With `include_usage` it carries `usage: null`, and once `usage` is known (the
    last token) a chunk with no choices carries it."""
    chunk = {**ctx.header(kind), "choices": [choice]}
    if not include_usage:
        return _sse(chunk)
    out = _sse({**chunk, "usage": None})
    if usage is not None:
        out += _sse({**ctx.header(kind), "choices": [], "usage": usage})
    return out


def _sse(payload: dict) -> bytes:
    return sse_event(dumps(payload), space=True)


def _error_event(e: ApiError) -> bytes:
    return _sse(stream_error_json(e))
