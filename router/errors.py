"""Errors that reach HTTP clients, with TGI's status codes, `error_type`s and message prefixes."""

from __future__ import annotations


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
    """An adapter_id that is not loaded: a 422 validation error over HTTP, NOT_FOUND over gRPC."""


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


class GenerationError(ApiError):
    status = 424
    error_type = "generation"

    def __init__(self, message: str):
        super().__init__(f"Request failed during generation: {message}")


class NotImplementedYetError(ApiError):
    status = 501
    error_type = "not_implemented"
