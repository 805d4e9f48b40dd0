"""Real third-party clients against the router over HTTP on 127.0.0.1 (fake workers behind it).

text-generation 0.7.0 and lorax-client 0.6.3 pin huggingface-hub<1.0, which transformers 5 cannot share,
so they are installed with --no-deps; a test whose client is missing is skipped. huggingface_hub's
InferenceClient is tested here in the version the venv has (>= 1.0); tests/e2e/test_hub_clients.py runs
0.36 (the version the other two pin) in a venv of its own. The sync clients run in
a thread (the server shares the test's event loop). Every stream test checks that events arrived: the
clients silently yield nothing for a body they cannot parse.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.router.conftest import BASE_MODEL_ID, SCRIPTS

text_generation = pytest.importorskip("text_generation", reason="pip install --no-deps text-generation")
lorax = pytest.importorskip("lorax", reason="pip install --no-deps lorax-client")
openai = pytest.importorskip("openai", reason="pip install openai")
hub = pytest.importorskip("huggingface_hub")
hub_errors = pytest.importorskip("huggingface_hub.errors")

MESSAGES = [{"role": "user", "content": "hi"}]
# text-generation and lorax-client call pydantic's deprecated `.dict()`.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")


@pytest.fixture
async def served(start_router):
    h = await start_router()
    for f in h.fakes:
        f.step_delay = 0.001
    return h


@pytest.fixture
def url(served) -> str:
    return str(served.http.make_url("")).rstrip("/")


def run(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


# ---- text-generation --------------------------------------------------------------------------


async def test_text_generation_client(url):
    client = text_generation.Client(url, timeout=30)
    r = await run(client.generate, "Hello", max_new_tokens=5)
    assert r.generated_text == SCRIPTS[0][:5]
    assert r.details.finish_reason == "length" and r.details.generated_tokens == 5
    assert len(r.details.tokens) == 5 and r.details.prefill == []

    def stream():
        return list(client.generate_stream("Hello", max_new_tokens=40))

    events = await run(stream)
    assert len(events) == len(SCRIPTS[0]) + 1
    last = events[-1]
    assert last.details is not None and last.details.finish_reason == "eos_token"
    assert "".join(e.token.text for e in events if not e.token.special) == last.generated_text == SCRIPTS[0]

    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        await run(client.generate, "Hello", max_new_tokens=10_000)

    chat = await run(client.chat, messages=MESSAGES, max_tokens=4, temperature=0)  # model is always "tgi"
    assert chat.choices[0].message.content == SCRIPTS[0][:4] and chat.model == BASE_MODEL_ID

    def chat_stream():  # it parses every `data:` line as JSON: the stream must not end in `[DONE]`
        return list(client.chat(messages=MESSAGES, max_tokens=4, temperature=0, stream=True))

    chunks = await run(chat_stream)
    assert len(chunks) == 4 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[0][:4]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_text_generation_chat_with_a_trailing_slash(url):
    """Given `url/`, text-generation posts chat to `//v1/chat/completions`; the router redirects it (308)."""
    client = text_generation.Client(url + "/", timeout=30)
    chat = await run(client.chat, messages=MESSAGES, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == SCRIPTS[0][:4]
    chunks = await run(lambda: list(client.chat(messages=MESSAGES, max_tokens=4, stream=True)))
    assert len(chunks) == 4 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[0][:4]
    aclient = text_generation.AsyncClient(url + "/", timeout=30)
    chunks = [c async for c in await aclient.chat(messages=MESSAGES, max_tokens=3, stream=True)]
    assert len(chunks) == 3 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[0][:3]
    assert (await run(client.generate, "Hello", max_new_tokens=2)).generated_text == SCRIPTS[0][:2]


async def test_text_generation_async_client(url):
    client = text_generation.AsyncClient(url, timeout=30)
    r = await client.generate("Hello", max_new_tokens=3, top_n_tokens=2)
    assert r.generated_text == SCRIPTS[0][:3] and len(r.details.top_tokens[0]) == 2
    events = [e async for e in client.generate_stream("Hello", max_new_tokens=4)]
    assert len(events) == 4 and events[-1].generated_text == SCRIPTS[0][:4]
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        [e async for e in client.generate_stream("Hello", max_new_tokens=10_000)]
    chunks = [c async for c in await client.chat(messages=MESSAGES, max_tokens=3, stream=True)]
    assert len(chunks) == 3 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[0][:3]


# ---- lorax-client -----------------------------------------------------------------------------


async def test_lorax_client_adapters(url):
    client = lorax.Client(url, timeout=30)
    texts = {}
    for adapter_id, slot in [(None, 0), ("org/adapter-one", 1), ("adapter-two", 2)]:
        r = await run(client.generate, "Hi", adapter_id=adapter_id, max_new_tokens=6)
        assert r.generated_text == SCRIPTS[slot][:6], adapter_id
        assert r.details.prompt_tokens == 3 and r.details.generated_tokens == 6
        texts[adapter_id] = r.generated_text
    assert len(set(texts.values())) == 3

    def stream():
        return list(client.generate_stream("Hi", adapter_id="adapter-two", max_new_tokens=6))

    events = await run(stream)
    assert len(events) == 6
    assert "".join(e.token.text for e in events) == events[-1].generated_text == texts["adapter-two"]
    assert events[-1].details.prompt_tokens == 3

    # max_new_tokens left to the server (lorax sends null): the fake's script ends with EOS.
    r = await run(client.generate, "Hi", adapter_id="org/adapter-one")
    assert r.generated_text == SCRIPTS[1] and r.details.finish_reason == "eos_token"


async def test_lorax_client_errors(url):
    client = lorax.Client(url, timeout=30)
    with pytest.raises(lorax.errors.ValidationError, match="adapter `missing` is not loaded"):
        await run(client.generate, "Hi", adapter_id="missing", max_new_tokens=2)

    def stream():
        return list(client.generate_stream("Hi", adapter_id="missing", max_new_tokens=2))

    with pytest.raises(lorax.errors.ValidationError, match="adapter `missing`"):
        await run(stream)
    # Features of LoRAX's this server lacks are refused, not ignored.
    for kwargs, name in [
        ({"merged_adapters": lorax.types.MergedAdapters(ids=["adapter-two"], weights=[1.0], density=1.0)},
         "merged_adapters"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object"}}}, "response_format"),
        ({"ignore_eos_token": True}, "ignore_eos_token"),
        ({"return_k_alternatives": 2}, "return_k_alternatives"),
    ]:  # fmt: skip
        with pytest.raises(lorax.errors.ValidationError, match=f"`{name}` is not supported"):
            await run(client.generate, "Hi", max_new_tokens=2, **kwargs)
    # adapter_source and api_token are accepted: the adapter is found by its loaded id.
    r = await run(client.generate, "Hi", adapter_id="adapter-two", adapter_source="local", api_token="t")
    assert r.generated_text == SCRIPTS[2]
    aclient = lorax.AsyncClient(url, timeout=1)
    r = await aclient.generate("Hi", adapter_id="org/adapter-one", max_new_tokens=3)
    assert r.generated_text == SCRIPTS[1][:3]


# ---- openai -----------------------------------------------------------------------------------


def _openai(url: str, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30, **kwargs)


async def test_openai_chat(url):
    client = _openai(url)
    r = await run(
        client.chat.completions.create, model="adapter-two", messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert r.choices[0].message.content == SCRIPTS[2][:5] and r.choices[0].finish_reason == "length"
    assert r.model == "adapter-two" and r.usage.completion_tokens == 5
    # `extra_body` lands at the top level: `adapter_id` picks the adapter as `model` does.
    r = await run(
        client.chat.completions.create,
        model="tgi",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        extra_body={"adapter_id": "org/adapter-one"},
    )
    assert r.choices[0].message.content == SCRIPTS[1][:5] and r.model == "org/adapter-one"

    def stream():
        return list(
            client.chat.completions.create(
                model="adapter-two",
                messages=MESSAGES,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    chunks = await run(stream)
    assert len(chunks) == 6  # five tokens, then the usage chunk
    assert "".join(c.choices[0].delta.content for c in chunks[:-1]) == SCRIPTS[2][:5]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


async def test_openai_completions(url):
    client = _openai(url)
    r = await run(
        client.completions.create, model="org/adapter-one", prompt="Hi", max_tokens=5, temperature=0
    )
    assert r.choices[0].text == SCRIPTS[1][:5] and r.usage.prompt_tokens == 3

    def stream():
        return list(
            client.completions.create(
                model="org/adapter-one", prompt="Hi", max_tokens=5, temperature=0, stream=True
            )
        )

    chunks = await run(stream)
    assert len(chunks) == 5 and "".join(c.choices[0].text for c in chunks) == SCRIPTS[1][:5]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_openai_strict_response_validation(url):
    client = _openai(url, _strict_response_validation=True)
    r = await run(client.chat.completions.create, model=BASE_MODEL_ID, messages=MESSAGES, temperature=0)
    assert r.choices[0].message.content == SCRIPTS[0] and r.choices[0].finish_reason == "stop"

    def stream():
        return list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=3, stream=True))

    assert len(await run(stream)) == 3
    r = await run(client.completions.create, model="adapter-two", prompt="Hi", max_tokens=3)
    assert len(r.choices[0].text) == 3


async def test_openai_models_and_unknown_model(url):
    client = _openai(url)
    models = await run(client.models.list)
    assert [m.id for m in models.data] == [BASE_MODEL_ID, "org/adapter-one", "adapter-two"]
    with pytest.raises(openai.NotFoundError) as info:
        await run(client.chat.completions.create, model="nope", messages=MESSAGES)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "`nope` does not exist" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await run(client.completions.create, model="nope", prompt="Hi")
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
        await run(client.chat.completions.create, model="tgi", messages=MESSAGES, presence_penalty=1.0)


async def test_openai_async_client(url):
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        stream = await client.chat.completions.create(
            model="org/adapter-one", messages=MESSAGES, max_tokens=4, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
        assert len(chunks) == 4 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[1][:4]


# ---- huggingface_hub ------------------------------------------------------------------------------


async def test_hub_text_generation(url):
    client = hub.InferenceClient(base_url=url, timeout=30)  # posts to `url` itself: TGI's `POST /`
    assert await run(client.text_generation, "Hi", max_new_tokens=5) == SCRIPTS[0][:5]
    r = await run(client.text_generation, "Hi", adapter_id="adapter-two", max_new_tokens=6, details=True)
    assert r.generated_text == SCRIPTS[2][:6] and r.details.finish_reason == "length"
    assert r.details.generated_tokens == 6 and len(r.details.tokens) == 6

    def stream(**kwargs):
        return list(client.text_generation("Hi", stream=True, **kwargs))

    texts = await run(stream, adapter_id="org/adapter-one", max_new_tokens=40)
    # Without details it yields every token's text, the EOS token's too (it does not filter specials).
    assert len(texts) == len(SCRIPTS[1]) + 1 and "".join(texts) == SCRIPTS[1] + "</s>"
    events = await run(stream, adapter_id="adapter-two", max_new_tokens=6, details=True)
    assert len(events) == 6 and "".join(e.token.text for e in events) == events[-1].generated_text
    assert events[-1].generated_text == SCRIPTS[2][:6] and events[-1].details.finish_reason == "length"

    with pytest.raises(hub_errors.ValidationError, match="adapter `missing` is not loaded"):
        await run(client.text_generation, "Hi", adapter_id="missing", max_new_tokens=2)
    with pytest.raises(hub_errors.ValidationError, match="adapter `missing`"):
        await run(stream, adapter_id="missing", max_new_tokens=2)

    # Given `url/generate` it posts there, streams too.
    on_generate = hub.InferenceClient(base_url=url + "/generate", timeout=30)
    r = await run(on_generate.text_generation, "Hi", adapter_id="adapter-two", max_new_tokens=3, details=True)
    assert r.generated_text == SCRIPTS[2][:3]
    texts = await run(lambda: list(on_generate.text_generation("Hi", max_new_tokens=4, stream=True)))
    assert texts == list(SCRIPTS[0][:4])

    info_client = hub.InferenceClient(base_url=url, provider="hf-inference", timeout=30)
    assert await run(info_client.health_check) is True
    assert (await run(info_client.get_endpoint_info))["model_id"] == BASE_MODEL_ID


async def test_hub_chat_completion(url):
    client = hub.InferenceClient(base_url=url, timeout=30)
    r = await run(client.chat_completion, MESSAGES, model="adapter-two", max_tokens=5, temperature=0)
    assert r.choices[0].message.content == SCRIPTS[2][:5] and r.model == "adapter-two"
    # Without `model=` it sends "dummy", which means the base model.
    r = await run(client.chat_completion, MESSAGES, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == SCRIPTS[0][:5] and r.model == BASE_MODEL_ID
    # The /v1 base URL reaches the same route; `extra_body` carries `adapter_id`.
    v1 = hub.InferenceClient(base_url=url + "/v1", timeout=30)
    r = await run(
        v1.chat_completion, MESSAGES, max_tokens=5, temperature=0, extra_body={"adapter_id": "adapter-two"}
    )
    assert r.choices[0].message.content == SCRIPTS[2][:5] and r.model == "adapter-two"

    def stream(**kwargs):
        return list(client.chat_completion(MESSAGES, max_tokens=5, temperature=0, stream=True, **kwargs))

    for model, slot in [("org/adapter-one", 1), (None, 0)]:
        chunks = await run(stream, model=model, stream_options={"include_usage": True})
        assert len(chunks) == 6, model  # five tokens, then the usage chunk
        assert "".join(c.choices[0].delta.content for c in chunks[:-1]) == SCRIPTS[slot][:5]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    with pytest.raises(hub_errors.HfHubHTTPError, match="`nope` does not exist") as info:
        await run(client.chat_completion, MESSAGES, model="nope", max_tokens=2)
    assert info.value.response.status_code == 404


async def test_hub_async_client(url):
    async with hub.AsyncInferenceClient(base_url=url, timeout=30) as client:
        texts = [t async for t in await client.text_generation("Hi", max_new_tokens=4, stream=True)]
        assert len(texts) == 4 and "".join(texts) == SCRIPTS[0][:4]
        r = await client.text_generation("Hi", adapter_id="adapter-two", max_new_tokens=4, details=True)
        assert r.generated_text == SCRIPTS[2][:4] and r.details.generated_tokens == 4
        stream = await client.chat_completion(
            MESSAGES, model="org/adapter-one", max_tokens=4, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
        assert len(chunks) == 4 and "".join(c.choices[0].delta.content for c in chunks) == SCRIPTS[1][:4]
        with pytest.raises(hub_errors.ValidationError, match="adapter `missing`"):
            await client.text_generation("Hi", adapter_id="missing", max_new_tokens=2)


# ---- errors once a stream started ---------------------------------------------------------------


async def test_errors_mid_stream_reach_each_client_as_its_error(served, url):
    for f in served.fakes:
        f.fail_at_token = 3  # two tokens arrive, then the worker fails

    def tgi_stream():
        events = []
        with pytest.raises(text_generation.errors.GenerationError, match="Request failed during generation"):
            for e in text_generation.Client(url, timeout=30).generate_stream("Hi", max_new_tokens=10):
                events.append(e)
        return events

    assert len(await run(tgi_stream)) == 2

    def lorax_stream():
        events = []
        with pytest.raises(lorax.errors.GenerationError, match="Request failed during generation"):
            for e in lorax.Client(url, timeout=30).generate_stream("Hi", max_new_tokens=10):
                events.append(e)
        return events

    assert len(await run(lorax_stream)) == 2

    def openai_stream():
        chunks = []
        with pytest.raises(openai.APIError, match="Request failed during generation"):
            for c in _openai(url).chat.completions.create(
                model="tgi", messages=MESSAGES, max_tokens=10, stream=True
            ):
                chunks.append(c)
        return chunks

    assert len(await run(openai_stream)) == 2

    def hub_streams():
        client = hub.InferenceClient(base_url=url, timeout=30)
        counts = []
        for call in (
            lambda: client.text_generation("Hi", max_new_tokens=10, stream=True),
            lambda: client.chat_completion(MESSAGES, max_tokens=10, stream=True),
        ):
            items = []
            with pytest.raises(hub_errors.GenerationError, match="Request failed during generation"):
                for item in call():
                    items.append(item)
            counts.append(len(items))
        return counts

    assert await run(hub_streams) == [2, 2]

    def tgi_chat_stream():
        chunks = []
        # text-generation's sync chat stream cannot map an error event (it reads `resp.status`, which
        # requests' Response lacks): clients.md 3.5. Its async client maps it.
        with pytest.raises(AttributeError, match="status"):
            for c in text_generation.Client(url, timeout=30).chat(
                messages=MESSAGES, max_tokens=10, stream=True
            ):
                chunks.append(c)
        return chunks

    assert len(await run(tgi_chat_stream)) == 2
    chunks = []
    with pytest.raises(text_generation.errors.GenerationError, match="Request failed during generation"):
        async for c in await text_generation.AsyncClient(url, timeout=30).chat(
            messages=MESSAGES, max_tokens=10, stream=True
        ):
            chunks.append(c)
    assert len(chunks) == 2


# ---- API_KEY ------------------------------------------------------------------------------------


async def test_each_client_passes_the_api_key(start_router):
    key = "s3cret"
    h = await start_router(api_key=key)
    url = str(h.http.make_url("")).rstrip("/")
    bearer = {"Authorization": f"Bearer {key}"}

    tgi = text_generation.Client(url, headers=bearer, timeout=30)
    assert (await run(tgi.generate, "Hi", max_new_tokens=2)).generated_text == SCRIPTS[0][:2]
    lx = lorax.Client(url, headers=bearer, timeout=30)
    assert (await run(lx.generate, "Hi", adapter_id="adapter-two", max_new_tokens=2)).generated_text == (
        SCRIPTS[2][:2]
    )
    oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    r = await run(oai.chat.completions.create, model="tgi", messages=MESSAGES, max_tokens=2)
    assert r.choices[0].message.content == SCRIPTS[0][:2]
    hc = hub.InferenceClient(base_url=url, api_key=key, timeout=30)
    assert await run(hc.text_generation, "Hi", max_new_tokens=2) == SCRIPTS[0][:2]

    # A wrong key: each client's error for a 401.
    with pytest.raises(openai.AuthenticationError):
        await run(_openai(url).chat.completions.create, model="tgi", messages=MESSAGES, max_tokens=2)
    with pytest.raises(text_generation.errors.UnknownError, match="Unauthorized"):
        await run(text_generation.Client(url, timeout=30).generate, "Hi", max_new_tokens=2)
    with pytest.raises(hub_errors.HfHubHTTPError) as info:
        await run(hub.InferenceClient(base_url=url, api_key="wrong").chat_completion, MESSAGES, max_tokens=2)
    assert info.value.response.status_code == 401
