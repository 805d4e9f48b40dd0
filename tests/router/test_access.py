"""API_KEY (401 on every POST route and GET /v1/adapters, info routes open), PAYLOAD_LIMIT (413), and POST
/tokenize."""

from __future__ import annotations

import pytest

from router.auth import PRIVATE_GET_ROUTES, authorized
from tests.route_bodies import BODIES  # a POST route missing there is only checked for 401

KEY = "s3cret-Key"
UNAUTHORIZED = {"error": "Unauthorized", "error_type": "authentication"}


def _routes(h, method: str) -> list[str]:
    return sorted({r.resource.canonical for r in h.http.server.app.router.routes() if r.method == method})


async def test_every_generation_route_needs_the_key(start_router):
    h = await start_router(api_key=KEY)
    posts = _routes(h, "POST")
    assert {"/generate", "/", "/tokenize"} <= set(posts)
    for path in posts:
        body = BODIES.get(path, {})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = await h.http.post(path, json=body, headers=headers)
            assert resp.status == 401, (path, headers)
            assert await resp.json() == UNAUTHORIZED
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        resp = await h.http.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status == 200 if path in BODIES else resp.status != 401, (path, await resp.text())
    # Nothing ran for the refused requests.
    assert h.state.metrics.registry.get_sample_value("tgi_request_failure_total") is None


async def test_info_routes_stay_open_and_private_ones_need_the_key(start_router):
    h = await start_router(api_key=KEY)
    gets = _routes(h, "GET")
    assert {"/health", "/info", "/metrics", "/docs", "/api-doc/openapi.json"} <= set(gets)
    assert set(gets) >= PRIVATE_GET_ROUTES == {"/v1/adapters"}
    for path in gets:
        resp = await h.http.get(path)
        assert resp.status == (401 if path in PRIVATE_GET_ROUTES else 200), (path, resp.status)
    for path in PRIVATE_GET_ROUTES:
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = await h.http.get(path, headers=headers)
            assert resp.status == 401 and await resp.json() == UNAUTHORIZED
        resp = await h.http.get(path, headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status == 200, path
    # Unknown routes and wrong methods keep their own errors.
    assert (await h.http.post("/nope", json={})).status == 404
    assert (await h.http.post("/info", json={})).status == 405


async def test_without_a_key_any_authorization_header_is_ignored(start_router):
    # huggingface_hub sends HF_TOKEN as a bearer token to any server; the openai client always sends one.
    h = await start_router()
    resp = await h.http.post("/generate", json=BODIES["/generate"], headers={"Authorization": "Bearer hf_x"})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),
        (f"  BEARER   {KEY} ", True),
        (f"Bearer {KEY.upper()}", False),  # TGI would accept this (it ignores case)
        (f"Bearer {KEY}x", False),
        (f"Basic {KEY}", False),
        (KEY, False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_authorized(header, ok):
    assert authorized(header, KEY) is ok
    assert authorized(header, None) is True


async def test_payload_limit(start_router):
    h = await start_router(payload_limit=1000)
    resp = await h.http.post("/generate", json={"inputs": "x" * 1000})
    assert resp.status == 413
    body = await resp.json()
    assert body["error_type"] == "request_entity_too_large"
    assert "1000" in body["error"]
    resp = await h.http.post("/generate", json={"inputs": "x" * 900, "parameters": {"max_new_tokens": 1}})
    assert resp.status == 422  # under the limit; 901 tokens are more than max_input_tokens
    resp = await h.http.post("/tokenize", json={"inputs": "x" * 2000})
    assert resp.status == 413


# ---- /tokenize -----------------------------------------------------------------------------------


async def test_tokenize(start_router, encode):
    h = await start_router()
    resp = await h.http.post("/tokenize", json={"inputs": "Hello"})
    assert resp.status == 200
    tokens = await resp.json()
    assert tokens[0] == {"id": 1, "text": "", "start": 0, "stop": 0}  # BOS from the post-processor
    assert [t["id"] for t in tokens[1:]] == encode("Hello")
    assert [(t["text"], t["start"], t["stop"]) for t in tokens[1:]] == [
        (c, i, i + 1) for i, c in enumerate("Hello")
    ]
    # Offsets count characters; a two-byte character spans two byte-level tokens.
    tokens = await (await h.http.post("/tokenize", json={"inputs": "aé"})).json()
    assert [t["id"] for t in tokens[1:]] == encode("aé")
    assert [(t["text"], t["start"], t["stop"]) for t in tokens[1:]] == [("a", 0, 1), ("é", 1, 2), ("é", 1, 2)]


async def test_tokenize_truncates_like_generation(start_router, encode):
    h = await start_router()
    tokens = await (
        await h.http.post("/tokenize", json={"inputs": "Hello", "parameters": {"truncate": 3}})
    ).json()
    assert [t["id"] for t in tokens] == [1, *encode("lo")]
    assert [t["text"] for t in tokens] == ["", "l", "o"]
    resp = await h.http.post("/tokenize", json={"inputs": "Hello", "parameters": {"truncate": 0}})
    assert resp.status == 422
    assert (await resp.json())["error"] == (
        "Input validation error: `truncate` must be strictly positive and less than 255. Given: 0"
    )
    resp = await h.http.post("/tokenize", json={"parameters": {}})
    assert resp.status == 422
