"""API key (TGI's API_KEY): generation needs `Authorization: Bearer <key>`, information stays open.

HTTP: as in TGI, every POST route needs the key (/, /generate, /generate_stream, /v1/completions,
/v1/chat/completions, /tokenize, /v1/load_lora_adapter, /v1/unload_lora_adapter, and any POST route added
later), and every GET route is open (/health, /info, /metrics, /docs, /api-doc/openapi.json, /v1/models)
except `PRIVATE_GET_ROUTES`: GET /v1/adapters shows where each adapter's files are. The public gRPC
service checks the `authorization` metadata the same way, on every method; gRPC health stays open.

Differences from TGI: the key is compared in constant time and case-sensitively (TGI compares the whole
header value ignoring case, so it accepts a key in the wrong case); only the scheme `Bearer` is
case-insensitive. A failure is 401 with the usual error JSON and `WWW-Authenticate: Bearer` (TGI: a bare
401).
"""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web

from router.config import RouterConfig
from router.errors import UnauthorizedError
from router.middleware import error_response
from router.state import CONFIG

PRIVATE_GET_ROUTES = frozenset({"/v1/adapters"})


def authorized(header: str | None, api_key: str | None) -> bool:
    """Whether an Authorization header value carries `api_key`; anything goes without a key."""
    if api_key is None:
        return True
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def needs_key(request: web.Request, config: RouterConfig) -> bool:
    """POST routes and private GET routes that exist need the key (an unknown route stays a 404, a wrong
    method a 405)."""
    if config.api_key is None or request.match_info.http_exception is not None:
        return False
    if request.method == hdrs.METH_POST:
        return True
    route = request.match_info.route.resource
    return route is not None and route.canonical in PRIVATE_GET_ROUTES


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    if needs_key(request, config) and not authorized(request.headers.get(hdrs.AUTHORIZATION), config.api_key):
        e = UnauthorizedError()
        return error_response(e.status, e.message, e.error_type, headers={hdrs.WWW_AUTHENTICATE: "Bearer"})
    return await handler(request)
