"""OpenAI's request bodies (chat and legacy completions) as pydantic models, and its response shapes.

Requests accept what OpenAI's and Hugging Face's clients send: unknown keys are ignored and an explicit
`null` means "the default" (text-generation's chat client sends `"tools": null`, `"logprobs": null`, ...);
types are strict and numbers finite, as in TGI's bodies (`RequestBody`, router/schemas.py).
Features this server does not have are refused with a 422 naming the parameter, not silently ignored.

Responses carry what strict clients need: text-generation's chat types want `system_fingerprint`,
`usage` and `choices[].logprobs` present (null allowed), and a `delta.role` and `delta.tool_calls` key
in every chunk; openai's types want `finish_reason` in {"stop", "length"} and integer `created`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.errors import ApiError
from router.schemas import RequestBody
from router.sequence import FinishReason, GenerationResult, Token


class StreamOptions(RequestBody):
    include_usage: bool = False


class ChatMessage(BaseModel):
    """One message; keys other than role and content (name, tool_calls, ...) reach the template as given."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class _Sampling(RequestBody):
    """What chat and completions share."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # Not OpenAI's: the adapter by its TGI name (clients' `extra_body`), and TGI's and vLLM's extensions.
    adapter_id: str | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


# ---- errors -------------------------------------------------------------------------------------


class OpenAIError(ApiError):
    """A request OpenAI's API shape refuses; `param` names the offending field."""

    status = 422
    error_type = "validation"

    def __init__(self, message: str, param: str | None = None, *, status: int = 422, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class ModelNotFoundError(OpenAIError):
    error_type = "model_not_found"

    def __init__(self, model: str, param: str = "model", detail: str | None = None):
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"The model `{model}` does not exist{why}; GET /v1/models lists the base model and its adapters",
            param,
            status=404,
            code="model_not_found",
        )


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 and status != 424 else "server_error"


def error_json(e: ApiError) -> dict:
    """OpenAI's envelope (openai reads `.message`, `.type`, `.code`, `.param`) plus TGI's `error_type`
    (text-generation's and huggingface_hub's clients map it to their error classes)."""
    return {
        "error": {
            "message": e.message,
            "type": _openai_type(e.status),
            "code": getattr(e, "code", None) or e.error_type,
            "param": getattr(e, "param", None),
        },
        "error_type": e.error_type,
    }


def stream_error_json(e: ApiError) -> dict:
    """An error event after a stream started: the envelope plus TGI's `http_status_code`."""
    out = error_json(e)
    out["error"]["http_status_code"] = e.status
    return out


# ---- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseContext:
    """What every response and chunk of one completion repeats, and the stop sequences its text omits."""

    id: str
    created: int
    model: str
    """The adapter id, or the base model's id."""
    stops: list[str]
    system_fingerprint: str

    def header(self, kind: str) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's values: an EOS token or a stop sequence is "stop", running out of tokens "length"."""
    return "length" if reason is FinishReason.LENGTH else "stop"


def output_text(result: GenerationResult, stops: list[str]) -> str:
    """The generated text without the stop sequence that ended it (OpenAI leaves it out; TGI keeps it)."""
    text = result.generated_text
    if result.finish_reason is FinishReason.STOP_SEQUENCE:
        matched = [s for s in stops if s and text.endswith(s)]
        if matched:
            return text[: -max(len(s) for s in matched)]
    return text


def visible_tokens(r: GenerationResult) -> list[tuple[Token, tuple[Token, ...]]]:
    """The generated tokens that are part of the text (not special ones such as EOS), with alternatives."""
    return [(t, top) for t, top in zip(r.tokens, r.top_tokens, strict=True) if not t.special]


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprob(x: float | None) -> float:
    # OpenAI's logprobs are numbers; a token the worker gave no finite logprob gets OpenAI's floor.
    return x if x is not None and math.isfinite(x) else -9999.0


def chat_logprob_json(token: Token, top: tuple[Token, ...]) -> dict:
    """One entry of a chat choice's `logprobs.content`."""

    def entry(t: Token) -> dict:
        return {"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode())}

    return {**entry(token), "top_logprobs": [entry(t) for t in top]}


def completion_logprobs_json(tokens: list[tuple[Token, tuple[Token, ...]]], offset: int = 0) -> dict:
    """Legacy completions' `logprobs`: parallel lists, `text_offset` counted from `offset`."""
    offsets = []
    for token, _ in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t, _ in tokens],
        "token_logprobs": [_logprob(t.logprob) for t, _ in tokens],
        "top_logprobs": [{a.text: _logprob(a.logprob) for a in top} for _, top in tokens],
        "text_offset": offsets,
    }
