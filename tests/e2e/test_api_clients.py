"""Every text-generation route, and real clients, against the launcher on the tiny model with two adapters.

Greedy decoding in float32 is batch-invariant, so each route must give exactly the tokens /generate gives
for the same prompt and adapter: streaming or not, TGI or OpenAI, our HTTP or a third-party client.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from transformers import AutoTokenizer

from tests.e2e.harness import Server
from tests.e2e.test_serving import tiny_env

# text-generation and lorax-client call pydantic's deprecated `.dict()`.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")]

text_generation = pytest.importorskip("text_generation", reason="pip install --no-deps text-generation")
lorax = pytest.importorskip("lorax", reason="pip install --no-deps lorax-client")
openai = pytest.importorskip("openai", reason="pip install openai")

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 8
ADAPTERS = ("a_r4", "b_r8")


@pytest.fixture(scope="module")
def server(e2e_model_dir, e2e_adapters, tmp_path_factory):
    adapters = {name: e2e_adapters[name] for name in ADAPTERS}
    s = Server(tmp_path_factory.mktemp("api") / "launcher.log", env=tiny_env(e2e_model_dir, adapters))
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def reference(server):
    """/generate's greedy output per adapter (None = base model)."""
    out = {}
    for adapter in (None, *ADAPTERS):
        status, body = server.generate(PROMPT, max_new_tokens=NEW_TOKENS, details=True, adapter_id=adapter)
        assert status == 200, body
        out[adapter] = body
    texts = [out[a]["generated_text"] for a in out]
    assert len(set(texts)) == len(texts), texts  # the adapters change the output
    return out


def sse(url: str, body: dict) -> list[bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        raw = resp.read()
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_generate_stream_equals_generate(server, reference, adapter):
    events = sse(
        server.url + "/generate_stream",
        {
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": NEW_TOKENS, "adapter_id": adapter, "details": True},
        },
    )
    assert all(e.startswith(b"data:{") for e in events)
    parsed = [json.loads(e.removeprefix(b"data:")) for e in events]
    ref = reference[adapter]
    assert [p["token"]["id"] for p in parsed] == [t["id"] for t in ref["details"]["tokens"]]
    assert parsed[-1]["generated_text"] == ref["generated_text"]
    assert parsed[-1]["details"]["finish_reason"] == ref["details"]["finish_reason"]


def test_third_party_tgi_clients(server, reference):
    tgi = text_generation.Client(server.url, timeout=120)
    r = tgi.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert r.generated_text == reference[None]["generated_text"]
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS))
    assert events and events[-1].generated_text == reference[None]["generated_text"]

    lx = lorax.Client(server.url, timeout=120)
    for adapter in ADAPTERS:
        r = lx.generate(PROMPT, adapter_id=adapter, max_new_tokens=NEW_TOKENS)
        assert r.generated_text == reference[adapter]["generated_text"], adapter
        events = list(lx.generate_stream(PROMPT, adapter_id=adapter, max_new_tokens=NEW_TOKENS))
        assert events and events[-1].generated_text == reference[adapter]["generated_text"]
    with pytest.raises(lorax.errors.ValidationError, match="not loaded"):
        lx.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)


def test_openai_client_picks_adapters_by_model(server, reference, e2e_model_dir):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data][1:] == list(ADAPTERS)
    # The chat template's prompt through /generate is the reference for the chat route.
    prompt = AutoTokenizer.from_pretrained(e2e_model_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    for adapter in ADAPTERS:
        status, ref = server.generate(prompt, max_new_tokens=NEW_TOKENS, adapter_id=adapter)
        assert status == 200, ref
        chat = client.chat.completions.create(
            model=adapter, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0
        )
        assert chat.choices[0].message.content == ref["generated_text"], adapter
        chunks = list(
            client.chat.completions.create(
                model=adapter, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0, stream=True
            )
        )
        assert chunks and "".join(c.choices[0].delta.content for c in chunks) == ref["generated_text"]

        completion = client.completions.create(
            model=adapter, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
        )
        assert completion.choices[0].text == reference[adapter]["generated_text"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
