"""What the TGI and OpenAI handlers share: reading a JSON body into a model, and TGI's x-* headers."""

from __future__ import annotations

import functools
import json
import time
from importlib import metadata
from typing import TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from router.errors import BodyError, UnsupportedMediaTypeError
from router.schemas import problems
from router.sequence import GenerationResult
from router.state import State

Body = TypeVar("Body", bound=BaseModel)


async def read_json(request: web.Request, model: type[Body]) -> Body:
    """The body as `model`: 415 without a JSON content type, 400 if not JSON, 422 if not the model."""
    if hdrs.CONTENT_TYPE not in request.headers or not _is_json(request.content_type):
        raise UnsupportedMediaTypeError()
    raw = await request.read()
    if not raw.strip():
        raise BodyError("Failed to parse the request body as JSON: the body is empty", 400)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"Failed to parse the request body as JSON: {e}", 400) from None
    try:
        return model.model_validate(data)
    except PydanticValidationError as e:
        raise BodyError(
            f"Failed to deserialize the JSON body into the target type: {problems(e)}", 422
        ) from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def timing_headers(
    state: State, inputs: str, r: GenerationResult, start: float, validated: float
) -> dict[str, str]:
    """TGI's x-* headers of a finished request; times in milliseconds except x-compute-time (seconds)."""
    total = time.monotonic() - start
    return {
        "x-compute-type": compute_type(state),
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": _ms(total),
        "x-validation-time": _ms(validated - start),
        "x-queue-time": _ms(r.queue_s),
        "x-inference-time": _ms(r.inference_s),
        "x-time-per-token": _ms(r.inference_s / max(r.generated_tokens, 1)),
        "x-prompt-tokens": str(r.prompt_tokens),
        "x-generated-tokens": str(r.generated_tokens),
    }


def stream_headers(
    state: State, inputs: str, prompt_tokens: int, start: float, validated: float
) -> dict[str, str]:
    """A stream's headers leave before any token: TGI's three, plus what validation already knows."""
    return {
        "x-compute-type": compute_type(state),
        "x-compute-characters": str(len(inputs)),
        "x-validation-time": _ms(validated - start),
        "x-prompt-tokens": str(prompt_tokens),
        "X-Accel-Buffering": "no",
    }


def compute_type(state: State) -> str:
    return state.worker_info.device_type or "unknown"


@functools.cache
def server_version() -> str:
    try:
        return metadata.version("multilora")
    except metadata.PackageNotFoundError:
        return "unknown"
