"""Errors that reach HTTP clients, with TGI's status codes, `error_type`s and message prefixes, and
`adapter_error`, which maps the adapter registry's errors to them (one table: docs/api.md).

Adapter errors, by where they happen (generation requests / POST /v1/load_lora_adapter /
POST /v1/unload_lora_adapter; gRPC):
  resolves nowhere             422 validation / 404 / -            NOT_FOUND
  refused (escape, syntax)     422 validation / 400 / -            INVALID_ARGUMENT
  already registered           -              / 400 / -            ALREADY_EXISTS
  not registered               -              / -   / 404          NOT_FOUND
  a worker refused the adapter 422 validation (all routes)         FAILED_PRECONDITION
  a worker failed loading it   424 generation (all routes)         INTERNAL
  Hub download failed          502 adapter_download                UNAVAILABLE
  every slot pinned, or none   503 adapter_capacity                RESOURCE_EXHAUSTED
502, not TGI's 424: the failure is upstream of this server (the Hub), and lorax-client reads 424 as a
failed generation; 502 tells clients the request itself was fine and may succeed later.
"""

from __future__ import annotations

from typing import Literal

from router.adapter_resolver import (
    AdapterDownloadError,
    AdapterNotFoundError,
    AdapterRefusedError,
    AdapterResolveError,
)
from router.adapters import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterLoadFailedError,
    UnknownAdapterError,
)


class ApiError(Exception):
    """An error with its HTTP status; the error middleware renders `{"error", "error_type"}`."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ValidationError(ApiError):
    status = 422
    error_type = "validation"

    def __init__(self, message: str):
        super().__init__(f"Input validation error: {message}")


class AdapterNotLoadedError(ValidationError):
    """An adapter_id that is not loaded and resolves nowhere: a 422 validation error over HTTP, NOT_FOUND
    over gRPC."""


class BadRequestError(ApiError):
    status = 400
    error_type = "validation"


class AdapterExistsApiError(BadRequestError):
    """The load route named a registered adapter (400, as vLLM; gRPC ALREADY_EXISTS)."""


class NotFoundError(ApiError):
    status = 404
    error_type = "not_found"


class AdapterLoadApiError(ApiError):
    """A worker refused the adapter (422 validation; gRPC FAILED_PRECONDITION) or failed (424)."""

    def __init__(self, message: str, refused: bool):
        super().__init__(f"Input validation error: {message}" if refused else message)
        self.refused = refused
        self.status, self.error_type = (422, "validation") if refused else (424, "generation")


class AdapterDownloadApiError(ApiError):
    status = 502
    error_type = "adapter_download"


class AdapterCapacityApiError(ApiError):
    status = 503
    error_type = "adapter_capacity"


class UnauthorizedError(ApiError):
    status = 401
    error_type = "authentication"

    def __init__(self) -> None:
        super().__init__("Unauthorized")


class BodyError(ApiError):
    """The body is not JSON (400) or not a GenerateRequest (422); typed `validation` so clients map it."""

    error_type = "validation"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UnsupportedMediaTypeError(ApiError):
    status = 415
    error_type = "unsupported_media_type"

    def __init__(self) -> None:
        super().__init__("Expected request with `Content-Type: application/json`")


class OverloadedError(ApiError):
    status = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class AdapterQueueFullError(OverloadedError):
    """One adapter already holds its share of the queue (ADAPTER_QUEUE_SHARE): 429 naming it, so its
    clients back off while other adapters' requests are still taken (gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, adapter_id: str, limit: int) -> None:
        ApiError.__init__(
            self,
            f"Model is overloaded: adapter `{adapter_id}` already has {limit} requests waiting, "
            "its share of the queue",
        )
        self.adapter_id = adapter_id


class GenerationError(ApiError):
    status = 424
    error_type = "generation"

    def __init__(self, message: str):
        super().__init__(f"Request failed during generation: {message}")


class NotImplementedYetError(ApiError):
    status = 501
    error_type = "not_implemented"


def adapter_error(e: Exception, where: Literal["request", "load", "unload"]) -> ApiError:
    """The registry's error `e` as the answer of a generation request, the load route or the unload
    route (the table above); raises `e` itself if it is not an adapter error."""
    if isinstance(e, AdapterNotFoundError):
        if where == "request":
            return AdapterNotLoadedError(
                f"adapter `{e.adapter_id}` is not loaded: {e}; `GET /info` lists the loaded adapters"
            )
        return NotFoundError(str(e))
    if isinstance(e, AdapterRefusedError):
        return ValidationError(str(e)) if where == "request" else BadRequestError(str(e))
    if isinstance(e, AdapterDownloadError):
        return AdapterDownloadApiError(str(e))
    if isinstance(e, AdapterResolveError):
        return ValidationError(str(e))
    if isinstance(e, AdapterLoadFailedError):
        return AdapterLoadApiError(str(e), e.refused)
    if isinstance(e, AdapterCapacityError):
        return AdapterCapacityApiError(str(e))
    if isinstance(e, AdapterExistsError):
        return AdapterExistsApiError(str(e))
    if isinstance(e, UnknownAdapterError):
        return NotFoundError(f"The lora adapter '{e.adapter_id}' cannot be found.")
    raise e


ADAPTER_ERRORS = (AdapterResolveError, AdapterLoadFailedError, AdapterCapacityError)
"""What `AdapterRegistry.acquire` raises."""
