"""The one error middleware: every error leaves as `{"error": ..., "error_type": ...}` JSON."""

from __future__ import annotations

import logging
import re

from aiohttp import hdrs, web

from router.errors import ApiError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None):
    return web.json_response({"error": message, "error_type": error_type}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message, e.error_type)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _http_error(request, e)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "Internal server error", "internal")


def _http_error(request: web.Request, e: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, body too large) in the JSON shape."""
    headers = {}
    if e.status == 404:
        message = f"No route for {request.method} {request.path}"
    elif e.status == 405:
        allowed = e.headers.get(hdrs.ALLOW, "")
        headers[hdrs.ALLOW] = allowed
        message = f"Method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    else:
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
    error_type = re.sub(r"\W+", "_", e.reason.lower()).strip("_")
    return error_response(e.status, message, error_type, headers)
