"""The OpenAPI 3.1 document of the HTTP API (GET /api-doc/openapi.json, as TGI, and /openapi.json) and a
self-contained HTML page of it (GET /docs; no CDN assets, the machines have no network).

The document is built from the app's route table (`router.routes.ROUTES`): one `Route` per method and
path, with its handler and the pydantic types of the request body, the 200 response
(router/responses.py) and the error body; schemas are generated from those models. The app registers
the same list, so every route is documented.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from router.auth import PRIVATE_GET_ROUTES
from router.responses import ErrorResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

JSON, TEXT, HTML, SSE = "application/json", "text/plain", "text/html", "text/event-stream"
DONE = "[DONE]"
# Errors answered before a route's handler runs (router/auth.py, aiohttp's body limit), so always in TGI's
# ErrorResponse shape, also on routes whose own errors have another shape (the OpenAI routes).
EDGE_ERRORS = (401, 413)
# The errors a generation route can answer, besides 200 (502 and 503: its adapter's download failed, or no
# slot can be freed for it).
GENERATION_ERRORS = (400, 401, 413, 415, 422, 424, 429, 502, 503)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: Any = None
    """The JSON body's type (a pydantic model), or None."""
    response: Any = None
    """The 200 body's type (any type pydantic can describe), or None for an empty body."""
    content_type: str = JSON
    stream: Any = None
    """The type of each `text/event-stream` event's data, for routes that stream (alone or as an option)."""
    stream_end: str | None = None
    """The data of a last event that is not JSON (OpenAI's `[DONE]`)."""
    errors: tuple[int, ...] = ()
    error: Any = None
    """The error body's type; None for TGI's ErrorResponse."""

    @property
    def needs_key(self) -> bool:
        """With API_KEY set, every POST route and the private GET routes need it (router/auth.py)."""
        return self.method == "POST" or self.path in PRIVATE_GET_ROUTES


_ERROR_TEXT = {
    400: "The body is not JSON, or (load route) the adapter is already registered or its path is refused",
    401: "API_KEY is set and the request lacks `Authorization: Bearer <key>`",
    404: "The model, adapter or lora_path resolves to no adapter",
    413: "The body exceeds PAYLOAD_LIMIT",
    415: "The content type is not JSON",
    422: "Input validation error, or an adapter the workers refused",
    424: "Generation (or an adapter load) failed in a worker",
    429: "Model is overloaded (max_concurrent_requests)",
    502: "The adapter's download from the Hugging Face Hub failed",
    503: "A worker rank is unhealthy, or every adapter slot holds a pinned adapter",
}


def build(routes: Sequence[Route], *, auth: bool, version: str) -> dict:
    """The OpenAPI document of `routes`; `auth` marks the routes that need the API key."""
    ref = "#/components/schemas/{model}"
    inputs = [(("req", i), "validation", TypeAdapter(r.request)) for i, r in enumerate(routes) if r.request]
    inputs += [
        (("resp", i), "serialization", TypeAdapter(r.response)) for i, r in enumerate(routes) if r.response
    ]
    inputs += [(("sse", i), "serialization", TypeAdapter(r.stream)) for i, r in enumerate(routes) if r.stream]
    inputs += [
        (("error", i), "serialization", TypeAdapter(r.error or ErrorResponse)) for i, r in enumerate(routes)
    ]
    inputs.append((("error", "edge"), "serialization", TypeAdapter(ErrorResponse)))
    schemas, defs = TypeAdapter.json_schemas(inputs, ref_template=ref)
    edge_schema = schemas[("error", "edge"), "serialization"]
    paths: dict[str, dict] = {}
    for i, r in enumerate(routes):
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {r.content_type: {"schema": schemas[("resp", i), "serialization"]}}
        error_schema = schemas[("error", i), "serialization"]
        if r.stream is not None:
            event = sse_event_schema(schemas[("sse", i), "serialization"], error_schema, r.stream_end)
            ok.setdefault("content", {})[SSE] = {"schema": event}
        error_schemas = {c: edge_schema if c in EDGE_ERRORS else error_schema for c in r.errors}
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_') or 'root'}",
            "responses": {"200": ok} | {str(c): _error(c, schema) for c, schema in error_schemas.items()},
        }
        if r.request is not None:
            body = {"content": {JSON: {"schema": schemas[("req", i), "validation"]}}}
            op["requestBody"] = {"required": True, **body}
        if auth and r.needs_key:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "multilora",
            "description": "One base LLM, many LoRA adapters in the same batch; TGI-compatible API.",
            "version": version,
            "license": {"name": "Apache-2.0"},
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _error(code: int, schema: dict) -> dict:
    return {"description": _ERROR_TEXT[code], "content": {JSON: {"schema": schema}}}


def sse_event_schema(data: dict, error: dict, end: str | None) -> dict:
    """One server-sent event as an object of its fields, the way OpenAPI 3.2 (`itemSchema`) and tools for
    3.1 read an event stream: `data` is JSON, `data` or an error after the stream started (or `end`)."""
    json_data = {"type": "string", "contentMediaType": JSON, "contentSchema": {"anyOf": [data, error]}}
    return {
        "type": "object",
        "description": "One event: `data:<json>` and a blank line",
        "required": ["data"],
        "properties": {
            "data": json_data if end is None else {"anyOf": [json_data, {"const": end}]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


def render_html(doc: dict) -> str:
    """A plain page listing every operation with its schemas (no scripts, no external assets)."""
    rows, sections = [], []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            anchor = op["operationId"]
            lock = " &#128274;" if "security" in op else ""
            rows.append(
                f'<tr><td><code>{method.upper()}</code></td><td><a href="#{anchor}"><code>'
                f"{html.escape(path)}</code></a>{lock}</td><td>{html.escape(op['summary'])}</td></tr>"
            )
            parts = [f'<h3 id="{anchor}"><code>{method.upper()} {html.escape(path)}</code></h3>']
            if "requestBody" in op:
                parts.append(_schema_block("Request body", op["requestBody"]["content"][JSON]["schema"]))
            for code, resp in op["responses"].items():
                content = resp.get("content", {})
                for ctype, spec in content.items():
                    parts.append(_schema_block(f"{code} {resp['description']} ({ctype})", spec["schema"]))
                if not content:
                    parts.append(f"<p>{code}: {html.escape(resp['description'])}</p>")
            sections.append("\n".join(parts))
    defs = [_schema_block(name, schema) for name, schema in doc["components"]["schemas"].items()]
    title = html.escape(f"{doc['info']['title']} {doc['info']['version']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title} API</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}pre{{background:#f4f4f4;padding:.5em}}
td{{padding:.2em .8em}}</style></head><body>
<h1>{title} API</h1><p>{html.escape(doc["info"]["description"])} The OpenAPI document:
<a href="/api-doc/openapi.json">/api-doc/openapi.json</a>. &#128274; = needs
<code>Authorization: Bearer &lt;API_KEY&gt;</code>.</p>
<table>{"".join(rows)}</table>
{"".join(sections)}
<h2>Schemas</h2>
{"".join(defs)}
</body></html>
"""


def _schema_block(title: str, schema: dict) -> str:
    text = html.escape(json.dumps(schema, indent=2))
    return f"<details><summary>{html.escape(title)}</summary><pre>{text}</pre></details>"
