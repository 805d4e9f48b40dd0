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

Several keys (API_KEYS, `tenant=key,...`; API_KEY counts as tenant `default`): any of them opens the same
routes, and the one a request carries names its tenant (`TENANT`, `request_tenant`), which the queue is
fair across when there are two or more (router/fairness.py). Every key is compared, so the time taken
does not tell which one matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import hdrs, web

from router.config import RouterConfig
from router.errors import UnauthorizedError
from router.middleware import error_response
from router.state import CONFIG

PRIVATE_GET_ROUTES = frozenset({"/v1/adapters"})
TENANT = web.RequestKey("tenant", str)


def tenant_for(header: str | None, keys: Mapping[str, str]) -> str | None:
    """The tenant whose key an Authorization header value carries; None when it carries none of `keys`."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    found = None
    for tenant, key in keys.items():  # no early exit: every key takes its comparison
        if hmac.compare_digest(token.strip().encode(), key.encode()):
            found = tenant
    return found


def authorized(header: str | None, api_key: str | None) -> bool:
    """Whether an Authorization header value carries `api_key`; anything goes without a key."""
    return api_key is None or tenant_for(header, {"": api_key}) is not None


def request_tenant(request: web.Request) -> str | None:
    """The tenant of the key `request` carried (None: the server has no keys, or the route needs none)."""
    return request.get(TENANT)


def needs_key(request: web.Request, config: RouterConfig) -> bool:
    """POST routes and private GET routes that exist need the key (an unknown route stays a 404, a wrong
    method a 405)."""
    if not config.tenant_keys() or request.match_info.http_exception is not None:
        return False
    if request.method == hdrs.METH_POST:
        return True
    route = request.match_info.route.resource
    return route is not None and route.canonical in PRIVATE_GET_ROUTES


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    if needs_key(request, config):
        tenant = tenant_for(request.headers.get(hdrs.AUTHORIZATION), config.tenant_keys())
        if tenant is None:
            e = UnauthorizedError()
            headers = {hdrs.WWW_AUTHENTICATE: "Bearer"}
            return error_response(e.status, e.message, e.error_type, headers=headers)
        request[TENANT] = tenant
    return await handler(request)
