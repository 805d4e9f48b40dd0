"""The OpenAPI document and /docs: every route of the app documented (and nothing else), references that
resolve, and real responses that match the documented models."""

from __future__ import annotations

import json

from pydantic import TypeAdapter

from router import responses, routes
from router.auth import PRIVATE_GET_ROUTES


def _app_routes(h) -> set[tuple[str, str]]:
    # aiohttp adds HEAD to every GET route by itself.
    return {(r.method, r.resource.canonical) for r in h.http.server.app.router.routes() if r.method != "HEAD"}


async def _document(h) -> dict:
    resp = await h.http.get("/api-doc/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc == await (await h.http.get("/openapi.json")).json()
    return doc


async def test_document_lists_exactly_the_app_routes(start_router):
    h = await start_router()
    doc = await _document(h)
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _app_routes(h)
    assert len(routes.ROUTES) == len(documented), "a route is listed twice in routes.ROUTES"
    # Each documented route is served by the handler the table names (nothing registered it again).
    served = {(r.method, r.resource.canonical): r.handler for r in h.http.server.app.router.routes()}
    assert {(r.method, r.path): r.handler for r in routes.ROUTES}.items() <= served.items()


async def test_document_is_well_formed(start_router):
    h = await start_router()
    doc = await _document(h)
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    refs = {m for m in _refs(doc)}
    assert refs and all(r.removeprefix("#/components/schemas/") in schemas for r in refs)
    generate = doc["paths"]["/generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompatGenerateRequest"}
    params = schemas["GenerateParameters"]["properties"]
    assert {"adapter_id", "max_new_tokens", "top_n_tokens", "stop", "seed", "details"} <= set(params)
    codes = {"200", "400", "401", "413", "415", "422", "424", "429", "502", "503"}
    assert set(generate["responses"]) == codes
    stream = doc["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    # Each event as an object of its fields; `data` holds a StreamResponse or an error as JSON.
    data = stream["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"]["anyOf"] == [
        {"$ref": "#/components/schemas/StreamResponse"},
        {"$ref": "#/components/schemas/ErrorResponse"},
    ]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"const": "[DONE]"} in chat["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"][
        "anyOf"
    ]
    # 401 comes from the auth middleware, in TGI's shape even on OpenAI's routes.
    assert chat["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert chat["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorResponse"
    }
    assert "security" not in generate  # no API_KEY here


async def test_security_only_with_an_api_key(start_router):
    h = await start_router(api_key="k")
    doc = await _document(h)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert ("security" in op) == (method == "post" or path in PRIVATE_GET_ROUTES), (method, path)
    assert "security" in doc["paths"]["/v1/adapters"]["get"]


async def test_responses_match_the_documented_models(start_router):
    h = await start_router()
    resp = await h.generate(
        "Hello",
        max_new_tokens=3,
        best_of=2,
        do_sample=True,
        top_n_tokens=2,
        decoder_input_details=True,
        details=True,
    )
    body = await resp.json()
    doc = responses.GenerateResponse.model_validate(body)
    assert doc.details and doc.details.best_of_sequences and doc.details.top_tokens and doc.details.prefill
    responses.GenerateResponse.model_validate(await (await h.generate("Hello", max_new_tokens=2)).json())
    resp = await h.http.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    TypeAdapter(list[responses.GenerateResponse]).validate_python(await resp.json())
    resp = await h.http.post("/tokenize", json={"inputs": "Hello"})
    TypeAdapter(list[responses.SimpleToken]).validate_python(await resp.json())
    responses.Info.model_validate(await (await h.http.get("/info")).json())
    responses.ErrorResponse.model_validate(await (await h.generate("Hello", max_new_tokens=0)).json())

    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 1}}
    resp = await h.http.post("/generate_stream", json=body)
    events = [
        line.removeprefix("data:") for line in (await resp.text()).splitlines() if line.startswith("data:")
    ]
    assert len(events) == 3
    for event in events:
        responses.StreamResponse.model_validate(json.loads(event))
    assert responses.StreamResponse.model_validate(json.loads(events[-1])).details is not None


async def test_openai_responses_match_the_documented_models(start_router):
    h = await start_router()
    messages = [{"role": "user", "content": "hi"}]
    resp = await h.http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "logprobs": True}
    )
    responses.ChatCompletion.model_validate(await resp.json())
    resp = await h.http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "stream": True}
    )
    for chunk in _sse(await resp.text()):
        responses.ChatCompletionChunk.model_validate(chunk)
    resp = await h.http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "logprobs": 1})
    responses.Completion.model_validate(await resp.json())
    resp = await h.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True})
    for chunk in _sse(await resp.text()):
        responses.Completion.model_validate(chunk)
    responses.ModelList.model_validate(await (await h.http.get("/v1/models")).json())
    resp = await h.http.post("/v1/completions", json={"prompt": "a", "model": "nope"})
    assert resp.status == 404
    responses.OpenAIErrorResponse.model_validate(await resp.json())


async def test_docs_page_is_self_contained(start_router):
    h = await start_router(api_key="k")
    resp = await h.http.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    for _, path in _app_routes(h):
        assert f"<code>{path}</code>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&#128274;" in page  # POST routes are marked as needing the key


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _sse(text: str) -> list[dict]:
    return [
        json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: {")
    ]
