"""OpenAI routes against the fake workers: shapes (stream or not), parameters, model -> adapter, errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from router import chat_template
from tests.router.conftest import BASE_MODEL_ID, SCRIPTS

MESSAGES = [{"role": "user", "content": "hi"}]
PROMPT = "<s>[user] hi\n[assistant] "  # the tiny tokenizer's template over MESSAGES
HEADER = {"id", "object", "created", "model", "system_fingerprint"}


def oai_events(raw: bytes, done: bool = True) -> list[dict]:
    """An OpenAI stream's chunks, checking the framing: `data: <json>` + blank line, then `data: [DONE]`
    (or, with `done=False`, nothing after the last chunk)."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-60:]
    assert text.endswith("data: [DONE]\n\n") == done, text[-60:]
    chunks = [c for c in text.split("\n\n")[: -2 if done else -1] if c != ":"]
    assert all(c.startswith("data: {") and "\n" not in c for c in chunks), chunks
    return [json.loads(c.removeprefix("data: ")) for c in chunks]


async def chat(h, **body):
    return await h.http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


async def complete(h, **body):
    return await h.http.post("/v1/completions", json=body)


def sent(h, i: int = -1):
    """The i-th sequence the worker was asked to prefill."""
    return [s for r in h.fakes[0].requests("Prefill") for s in r.sequences][i]


async def test_chat_completion_shape(start_router, encode):
    h = await start_router()
    resp = await chat(h, model="adapter-two", max_tokens=5, temperature=0)
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {*HEADER, "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "adapter-two"
    assert body["system_fingerprint"].endswith("-native")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": SCRIPTS[2][:5]},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    prompt_ids = encode(PROMPT)
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
    }
    # The template wrote BOS; the router did not add a second one.
    assert list(sent(h).token_ids) == prompt_ids and prompt_ids.count(1) == 1
    assert sent(h).lora_slot == 2
    assert (
        resp.headers["x-prompt-tokens"] == str(len(prompt_ids)) and resp.headers["x-generated-tokens"] == "5"
    )
    assert resp.headers["x-compute-characters"] == str(len(PROMPT))


async def test_chat_eos_and_stop_are_stop(start_router):
    h = await start_router()
    body = await (await chat(h, temperature=0)).json()
    assert body["choices"][0]["message"]["content"] == SCRIPTS[0]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(SCRIPTS[0]) + 1  # the EOS token counts
    # A stop sequence is left out of the text, as OpenAI leaves it out.
    body = await (await chat(h, model="adapter-two", temperature=0, stop="two;")).json()
    assert body["choices"][0]["message"]["content"] == " two, "
    assert body["choices"][0]["finish_reason"] == "stop"
    body = await (await chat(h, model="adapter-two", temperature=0, stop=["xx", "two."])).json()
    assert body["choices"][0]["message"]["content"] == " two, two; "


@pytest.mark.parametrize(
    "model, slot, echoed",
    [
        (None, 0, BASE_MODEL_ID),
        ("", 0, BASE_MODEL_ID),
        ("tgi", 0, BASE_MODEL_ID),
        ("dummy", 0, BASE_MODEL_ID),
        (BASE_MODEL_ID, 0, BASE_MODEL_ID),
        ("org/adapter-one", 1, "org/adapter-one"),
        ("adapter-two", 2, "adapter-two"),
    ],
)
async def test_model_selects_the_adapter(start_router, model, slot, echoed):
    h = await start_router()
    body = await (await chat(h, model=model, max_tokens=4, temperature=0)).json()
    assert body["model"] == echoed and body["choices"][0]["message"]["content"] == SCRIPTS[slot][:4]
    body = await (await complete(h, model=model, prompt="Hi", max_tokens=4, temperature=0)).json()
    assert body["model"] == echoed and body["choices"][0]["text"] == SCRIPTS[slot][:4]
    assert [s.lora_slot for r in h.fakes[0].requests("Prefill") for s in r.sequences] == [slot, slot]


async def test_adapter_id_field_selects_the_adapter(start_router):
    """`extra_body={"adapter_id": ...}` (openai, huggingface_hub) picks the adapter like `model` does."""
    h = await start_router()
    for model in (None, "tgi", "dummy", BASE_MODEL_ID, "adapter-two"):
        body = await (
            await chat(h, model=model, adapter_id="adapter-two", max_tokens=4, temperature=0)
        ).json()
        assert body["model"] == "adapter-two" and body["choices"][0]["message"]["content"] == SCRIPTS[2][:4]
    body = await (await complete(h, adapter_id="org/adapter-one", prompt="Hi", max_tokens=4)).json()
    assert body["model"] == "org/adapter-one" and body["choices"][0]["text"] == SCRIPTS[1][:4]
    assert [s.lora_slot for r in h.fakes[0].requests("Prefill") for s in r.sequences] == [2] * 5 + [1]

    resp = await chat(h, model="org/adapter-one", adapter_id="adapter-two")
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["param"] == "adapter_id" and "name different adapters" in err["message"]
    resp = await complete(h, adapter_id="nope", prompt="Hi")
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["param"] == "adapter_id" and err["code"] == "model_not_found"
    assert len(h.fakes[0].requests("Prefill")) == 6


async def test_doubled_or_trailing_slashes_redirect_to_the_route(start_router):
    h = await start_router()
    root = str(h.http.make_url("")).rstrip("/")
    post = h.http.session.post  # the test client refuses "//..." paths
    for path, target in [
        ("//v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/generate/", "/generate"),
    ]:
        resp = await post(root + path, json={"messages": MESSAGES}, allow_redirects=False)
        assert resp.status == 308 and resp.headers["Location"] == target, path
    resp = await post(root + "//v1/nothing", json={})
    assert resp.status == 404 and (await resp.json())["error_type"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404_in_openai_envelope(start_router, stream):
    h = await start_router()
    expected = {
        "error": {
            "message": "The model `nope` does not exist (adapter 'nope' not found; looked in: adapter roots "
            f"'{h.config.adapter_roots[0]}'; the Hugging Face cache; the Hub (download disabled: set "
            "ADAPTER_DOWNLOAD=true to allow it)); GET /v1/models lists the base model and its adapters",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        },
        "error_type": "model_not_found",
    }
    for resp in (
        await chat(h, model="nope", stream=stream),
        await complete(h, model="nope", prompt="x", stream=stream),
    ):
        assert resp.status == 404 and resp.content_type == "application/json"
        body = await resp.json()
        assert body == expected
    assert h.fakes[0].requests("Prefill") == []


async def test_models_lists_base_and_adapters(start_router):
    h = await start_router()
    body = await (await h.http.get("/v1/models")).json()
    base = {"object": "model", "created": 0, "owned_by": BASE_MODEL_ID}
    assert body == {
        "object": "list",
        "data": [
            {"id": BASE_MODEL_ID, **base, "parent": None},
            {"id": "org/adapter-one", **base, "parent": BASE_MODEL_ID},
            {"id": "adapter-two", **base, "parent": BASE_MODEL_ID},
        ],
    }


async def test_sampling_parameters_map_like_tgi(start_router):
    h = await start_router()
    await chat(h, max_tokens=2, temperature=0)
    p = sent(h).parameters
    assert not p.do_sample and p.temperature == 1.0
    # OpenAI's defaults (temperature 1, top_p 1) sample, with a random seed; top_p 1 is no filter.
    await chat(h, max_tokens=2, top_p=1.0)
    p = sent(h).parameters
    assert p.do_sample and p.top_p == 1.0 and p.temperature == 1.0
    await chat(
        h, max_tokens=2, temperature=0.5, top_p=0.9, seed=42, frequency_penalty=0.5, presence_penalty=0
    )
    p = sent(h).parameters
    assert p.do_sample and p.seed == 42 and p.frequency_penalty == 0.5
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    await complete(h, prompt="Hi", temperature=0.7, top_k=3, repetition_penalty=1.2)
    p = sent(h).parameters
    assert p.top_k == 3 and p.repetition_penalty == pytest.approx(1.2)
    # max_tokens: chat's default fills the context, completions' is 16; max_completion_tokens wins.
    body = await (await complete(h, prompt="Hi", temperature=0, model="adapter-two")).json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    body = await (await chat(h, temperature=0, max_tokens=9, max_completion_tokens=3)).json()
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "route, body, param, message",
    [
        ("chat", {"n": 2}, "n", "`n` must be 1"),
        ("chat", {"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ("chat", {"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format", "text"),
        ("chat", {"top_logprobs": 2}, "top_logprobs", "requires `logprobs: true`"),
        ("chat", {"logprobs": True, "top_logprobs": 6}, "top_logprobs", "<= 5. Given: 6"),
        ("chat", {"max_tokens": 0}, "max_tokens", "strictly positive"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
        ("completions", {"n": 3}, "n", "`n` must be 1"),
        ("completions", {"suffix": "x"}, "suffix", "Suffix is not supported"),
        ("completions", {"echo": True}, "echo", "not supported"),
        ("completions", {"best_of": 2}, "best_of", "must be 1"),
        ("completions", {"logprobs": 9}, "logprobs", "<= 5. Given: 9"),
        ("completions", {"prompt": ["a"] * 5}, "prompt", "maximum allowed batch size of 4"),
        ("completions", {"prompt": []}, "prompt", "empty"),
    ],
)
async def test_refused_parameters_name_themselves(start_router, route, body, param, message):
    h = await start_router()
    resp = await (chat(h, **body) if route == "chat" else complete(h, **{"prompt": "Hi", **body}))
    assert resp.status == 422
    err = await resp.json()
    assert err["error"]["param"] == param and message in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error" and err["error_type"] == "validation"


async def test_validation_and_body_errors_use_the_envelope(start_router):
    h = await start_router()
    resp = await chat(h, max_tokens=10_000)
    assert resp.status == 422
    err = await resp.json()
    assert err["error"]["message"].startswith("Input validation error: `inputs` tokens + `max_new_tokens`")
    assert err["error"]["code"] == "validation" and err["error_type"] == "validation"
    resp = await h.http.post("/v1/chat/completions", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await h.http.post("/v1/completions", json={"model": "tgi"})  # no prompt
    assert resp.status == 422 and "prompt" in (await resp.json())["error"]["message"]
    resp = await h.http.post("/v1/chat/completions", json={"messages": []})
    assert resp.status == 422


async def test_chat_content_parts_are_joined(start_router, encode):
    h = await start_router()
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    body = {"messages": [{"role": "user", "content": parts, "name": None}], "max_tokens": 2}
    assert (await h.http.post("/v1/chat/completions", json=body)).status == 200
    assert list(sent(h).token_ids) == encode(PROMPT)


async def test_template_error_is_422(start_router, monkeypatch):
    h = await start_router()
    template = chat_template.ChatTemplate("{{ raise_exception('only user turns') }}", {})
    monkeypatch.setattr(chat_template, "load", lambda _: template)
    resp = await chat(h)
    assert resp.status == 422
    err = await resp.json()
    assert err["error_type"] == "template_error" and "only user turns" in err["error"]["message"]


async def test_chat_logprobs(start_router):
    h = await start_router()
    body = await (await chat(h, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(SCRIPTS[0][:3])
    assert [c["logprob"] for c in content] == pytest.approx([-0.1, -0.2, -0.3])
    assert content[0]["bytes"] == list(SCRIPTS[0][0].encode())
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"] for c in content)
    assert sent(h).parameters.top_n_tokens == 2
    body = await (await chat(h, max_tokens=2, temperature=0, logprobs=True)).json()
    assert all(c["top_logprobs"] == [] for c in body["choices"][0]["logprobs"]["content"])


async def test_chat_stream_matches_non_stream(start_router):
    h = await start_router()
    full = await (await chat(h, model="org/adapter-one", temperature=0)).json()
    resp = await chat(h, model="org/adapter-one", temperature=0, stream=True)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    chunks = oai_events(await resp.read())
    assert len(chunks) == len(SCRIPTS[1]) + 1
    for c in chunks:
        assert set(c) == {*HEADER, "choices"}
        assert c["object"] == "chat.completion.chunk" and c["model"] == "org/adapter-one"
        assert c["id"] == chunks[0]["id"] and "usage" not in c
        (choice,) = c["choices"]
        assert choice["delta"]["role"] == "assistant" and choice["delta"]["tool_calls"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * len(SCRIPTS[1]) + ["stop"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == full["choices"][0]["message"]["content"] == SCRIPTS[1]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_model_tgi_streams_end_without_done(start_router, route):
    """text-generation's chat client (always `model: "tgi"`) fails on `[DONE]`; every other name gets it."""
    h = await start_router()
    body = {"messages": MESSAGES, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    for model, done in [("tgi", False), ("dummy", True), (BASE_MODEL_ID, True), (None, True)]:
        chunks = oai_events(await (await h.http.post(route, json={**body, "model": model})).read(), done)
        assert len(chunks) == 3 and chunks[-1]["choices"][0]["finish_reason"] == "length", model
    # The same holds for a stream that ends in an error event.
    for f in h.fakes:
        f.fail_at_token = 2
    chunks = oai_events(await (await h.http.post(route, json={**body, "model": "tgi"})).read(), False)
    assert len(chunks) == 2 and chunks[-1]["error_type"] == "generation"


async def test_chat_stream_include_usage(start_router, encode):
    h = await start_router()
    resp = await chat(h, max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = oai_events(await resp.read())
    assert [c["usage"] for c in chunks[:-1]] == [None] * 3
    assert chunks[-1]["choices"] == []
    n = len(encode(PROMPT))
    assert chunks[-1]["usage"] == {"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_never_sends_the_stop_sequence(start_router):
    h = await start_router()
    resp = await chat(h, model="adapter-two", temperature=0, stream=True, stop=["two;"])
    chunks = oai_events(await resp.read())
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert "".join(deltas) == " two, "
    assert not any(";" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions_shape_and_several_prompts(start_router, encode):
    h = await start_router()
    resp = await complete(
        h, model="adapter-two", prompt=["Hi", "Hello"], max_tokens=4, temperature=0, logprobs=1
    )
    body = await resp.json()
    assert set(body) == {*HEADER, "choices", "usage"}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == SCRIPTS[2][:4] and c["finish_reason"] == "length" for c in body["choices"])
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list(SCRIPTS[2][:4]) and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert all(len(t) == 1 for t in lp["top_logprobs"])
    prompt_tokens = len(encode("Hi")) + len(encode("Hello")) + 2  # each with BOS
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 8,
        "total_tokens": prompt_tokens + 8,
    }
    assert resp.headers["x-prompt-tokens"] == str(prompt_tokens) and resp.headers["x-generated-tokens"] == "8"


async def test_completions_stream_several_prompts(start_router):
    h = await start_router()
    for f in h.fakes:
        f.step_delay = 0.002
    resp = await complete(
        h, prompt=["Hi", "Hey"], model="org/adapter-one", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = oai_events(await resp.read())
    for c in chunks:
        assert set(c) == {*HEADER, "choices", "usage"}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == {0: SCRIPTS[1][:6], 1: SCRIPTS[1][:6]}
    finals = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1] and {f["finish_reason"] for f in finals} == {"length"}


async def test_error_mid_stream_is_an_openai_event_then_done(start_router):
    h = await start_router()
    for f in h.fakes:
        f.fail_at_token = 3
    resp = await chat(h, max_tokens=10, temperature=0, stream=True)
    assert resp.status == 200
    chunks = oai_events(await resp.read())
    assert len(chunks) == 3  # two tokens, then the error
    err = chunks[-1]
    assert set(err) == {"error", "error_type"} and err["error_type"] == "generation"
    assert err["error"]["http_status_code"] == 424 and err["error"]["type"] == "server_error"
    assert err["error"]["message"].startswith("Request failed during generation: ")


async def test_client_disconnect_mid_chat_stream_frees_blocks(start_router):
    h = await start_router()
    for f in h.fakes:
        f.step_delay = 0.01
    sched = h.state.scheduler
    resp = await chat(h, max_tokens=200, stream=True)
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: {")
    assert sched.blocks.num_free < sched.blocks.num_blocks
    resp.close()
    await h.settle()
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert len(h.fakes[0].requests("Decode")) < 100 and h.fakes[0].sequences == {}


async def test_concurrent_openai_and_tgi_requests_share_batches(start_router):
    h = await start_router()
    for f in h.fakes:
        f.step_delay = 0.005
    results = await asyncio.gather(
        chat(h, model="adapter-two", max_tokens=6, temperature=0),
        complete(h, model="org/adapter-one", prompt="Hi", max_tokens=6, temperature=0),
        h.generate("Hi", max_new_tokens=6),
    )
    a, b, c = [await r.json() for r in results]
    assert a["choices"][0]["message"]["content"] == SCRIPTS[2][:6]
    assert b["choices"][0]["text"] == SCRIPTS[1][:6]
    assert c["generated_text"] == SCRIPTS[0][:6]
    assert max(len(r.request_ids) for r in h.fakes[0].requests("Decode")) == 3


async def test_held_back_stop_prefix_is_flushed_when_no_stop_follows(start_router):
    h = await start_router()
    # " two" ends in "two", which could begin the stop "two;": held back, then sent with the last chunk.
    resp = await chat(h, model="adapter-two", temperature=0, stream=True, stop=["two;"], max_tokens=4)
    chunks = oai_events(await resp.read())
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert deltas == [" ", "", "", "two"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
