"""Every validation message and status code, and the JSON error shape for bodies that are not requests.

With the default fake (64 blocks of 4 tokens, max_position 512): max_total_tokens 256, max_input_tokens
255; "Hello" is 6 tokens (BOS + one per byte).
"""

from __future__ import annotations

import pytest

PREFIX = "Input validation error: "

CASES = [
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": -3}, "`max_new_tokens` must be strictly positive"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.5}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": -1}, "`top_k` must be strictly positive"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 255. Given: 0"),
    ({"truncate": 256}, "`truncate` must be strictly positive and less than 255. Given: 256"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"top_n_tokens": -1}, "`top_n_tokens` must be >= 0 and <= 5. Given: -1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"seed": -1}, "`seed` must be >= 0 and <= 18446744073709551615. Given: -1"),
    ({"grammar": {"type": "json", "value": {}}}, "grammar is not supported"),
    (
        {"max_new_tokens": 251},
        "`inputs` tokens + `max_new_tokens` must be <= 256. "
        "Given: 6 `inputs` tokens and 251 `max_new_tokens`",
    ),
    ({"adapter_id": "../nope"}, "adapter '../nope' refused: it contains a '..' component"),
]


@pytest.fixture
async def router(start_router):
    return await start_router(world_size=1)


@pytest.mark.parametrize(("parameters", "message"), CASES, ids=[m[:40] for _, m in CASES])
async def test_invalid_parameter(router, parameters, message):
    resp = await router.http.post("/generate", json={"inputs": "Hello", "parameters": parameters})
    assert resp.status == 422
    assert resp.content_type == "application/json"
    assert await resp.json() == {"error": PREFIX + message, "error_type": "validation"}
    assert router.fakes[0].requests("Prefill") == []


async def test_validation_order_matches_tgi(router):
    """The first failing check wins: temperature is checked before top_k, max_new_tokens before stop."""
    params = {"temperature": 0, "top_k": 0, "max_new_tokens": 0, "stop": ["a"] * 9}
    body = await (await router.http.post("/generate", json={"inputs": "x", "parameters": params})).json()
    assert body["error"] == PREFIX + "`temperature` must be strictly positive"
    params = {"max_new_tokens": 0, "stop": ["a"] * 9}
    body = await (await router.http.post("/generate", json={"inputs": "x", "parameters": params})).json()
    assert body["error"] == PREFIX + "`max_new_tokens` must be strictly positive"
    # An unknown adapter is reported only once everything else passes.
    params = {"adapter_id": "nope", "max_new_tokens": 0}
    body = await (await router.http.post("/generate", json={"inputs": "x", "parameters": params})).json()
    assert body["error"] == PREFIX + "`max_new_tokens` must be strictly positive"


async def test_empty_inputs(router):
    resp = await router.http.post("/generate", json={"inputs": "", "parameters": {}})
    assert resp.status == 422
    assert (await resp.json())["error"] == PREFIX + "`inputs` cannot be empty"


async def test_input_too_long(router):
    # 300 tokens: the total check fails first, as in TGI; with truncate it passes.
    long = "x" * 299
    resp = await router.http.post("/generate", json={"inputs": long, "parameters": {"max_new_tokens": 1}})
    assert resp.status == 422
    assert (await resp.json())["error"] == PREFIX + (
        "`inputs` tokens + `max_new_tokens` must be <= 256. Given: 300 `inputs` tokens and 1 `max_new_tokens`"
    )
    resp = await router.http.post(
        "/generate", json={"inputs": long, "parameters": {"max_new_tokens": 1, "truncate": 100}}
    )
    assert resp.status == 200
    sent = router.fakes[0].requests("Prefill")[-1].sequences[0].token_ids
    assert len(sent) == 100 and sent[0] == 1  # left truncation keeps the BOS


async def test_input_length_check(start_router):
    h = await start_router(world_size=1, max_input_tokens=10, max_total_tokens=100)
    resp = await h.http.post("/generate", json={"inputs": "x" * 10, "parameters": {"max_new_tokens": 5}})
    assert resp.status == 422
    assert (await resp.json())["error"] == PREFIX + "`inputs` must have less than 10 tokens. Given: 11"
    resp = await h.http.post("/generate", json={"inputs": "x" * 9, "parameters": {"max_new_tokens": 5}})
    assert resp.status == 200  # equality passes, as in TGI


async def test_max_best_of_one_disables_best_of(start_router):
    h = await start_router(world_size=1, max_best_of=1)
    resp = await h.generate("Hi", best_of=2, do_sample=True)
    assert (await resp.json())["error"] == PREFIX + "`best_of` must be > 0 and <= 1. Given: 2"


# ---- bodies that are not GenerateRequests -----------------------------------------------------------


async def _error(resp, status: int, error_type: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    return body["error"]


async def test_malformed_json(router):
    resp = await router.http.post(
        "/generate", data=b'{"inputs": "x",', headers={"Content-Type": "application/json"}
    )
    assert (await _error(resp, 400, "validation")).startswith("Failed to parse the request body as JSON")


async def test_missing_body(router):
    resp = await router.http.post("/generate", headers={"Content-Type": "application/json"})
    assert "body is empty" in await _error(resp, 400, "validation")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"parameters": {}}, "inputs"),
        ({"inputs": 5}, "inputs"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "20"}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 2.5}}, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"stop": "###"}}, "parameters.stop"),
        ({"inputs": "x", "parameters": {"details": "yes"}}, "parameters.details"),
        ({"inputs": "x", "parameters": []}, "parameters"),
        (["x"], "body"),
        ("x", "body"),
    ],
)
async def test_wrong_types(router, body, where):
    resp = await router.http.post("/generate", json=body)
    message = await _error(resp, 422, "validation")
    assert message.startswith("Failed to deserialize the JSON body into the target type: " + where)


async def test_wrong_content_type(router):
    resp = await router.http.post(
        "/generate", data=b'{"inputs": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert "application/json" in await _error(resp, 415, "unsupported_media_type")
    resp = await router.http.post("/generate", data=b'{"inputs": "x"}', skip_auto_headers=["Content-Type"])
    await _error(resp, 415, "unsupported_media_type")


async def test_body_too_large(router):
    resp = await router.http.post("/generate", json={"inputs": "x" * 2_100_000})
    await _error(resp, 413, "request_entity_too_large")


async def test_unknown_route_and_wrong_method(router):
    resp = await router.http.get("/nope")
    assert "GET /nope" in await _error(resp, 404, "not_found")
    resp = await router.http.get("/generate")
    assert "POST" in await _error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"
    resp = await router.http.post("/info", json={})
    await _error(resp, 405, "method_not_allowed")
