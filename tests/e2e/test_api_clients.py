"""Every text-generation route, and real clients, against the launcher on the tiny model with two adapters.

Greedy decoding in float32 is batch-invariant, so each route must give exactly the tokens /generate gives
for the same prompt and adapter: streaming or not, TGI or OpenAI, our HTTP or a third-party client.
huggingface_hub runs as a script (tests/e2e/hub_client.py) in two versions: the test venv's (>= 1.0) and
0.36, the one text-generation and lorax-client pin, from a cached venv of its own (tests/e2e/client_venv.py;
its first build needs the package index).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.e2e.client_venv import client_venv
from tests.e2e.harness import Server, get
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
HUB_CLIENT = Path(__file__).with_name("hub_client.py")
# The huggingface_hub that pip resolves next to text-generation 0.7.0 and lorax-client 0.6.3 (with aiohttp,
# which its AsyncInferenceClient needs).
HUB_036 = "huggingface_hub[inference]==0.36.2"


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


@pytest.fixture(scope="module")
def chat_reference(server, e2e_model_dir):
    """/generate's greedy output for the chat template's prompt over MESSAGES, per adapter."""
    prompt = AutoTokenizer.from_pretrained(e2e_model_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    out = {}
    for adapter in (None, *ADAPTERS):
        status, body = server.generate(prompt, max_new_tokens=NEW_TOKENS, adapter_id=adapter)
        assert status == 200, body
        out[adapter] = body["generated_text"]
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


def test_openai_client_picks_adapters_by_model(server, reference, chat_reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data][1:] == list(ADAPTERS)
    for adapter in ADAPTERS:
        chat = client.chat.completions.create(
            model=adapter, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0
        )
        assert chat.choices[0].message.content == chat_reference[adapter], adapter
        chunks = list(
            client.chat.completions.create(
                model=adapter, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0, stream=True
            )
        )
        assert chunks and "".join(c.choices[0].delta.content for c in chunks) == chat_reference[adapter]

        completion = client.completions.create(
            model=adapter, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
        )
        assert completion.choices[0].text == reference[adapter]["generated_text"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


def test_text_generation_chat(server, chat_reference):
    """text-generation's chat always sends `model: "tgi"` (the base model); its stream fails on `[DONE]`."""
    tgi = text_generation.Client(server.url, timeout=120)
    chat = tgi.chat(messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert chat.choices[0].message.content == chat_reference[None]
    chunks = list(tgi.chat(messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0, stream=True))
    assert chunks and "".join(c.choices[0].delta.content for c in chunks) == chat_reference[None]


@pytest.mark.parametrize("hub_version", ["test venv", "0.36"])
def test_huggingface_hub_clients(server, reference, chat_reference, hub_version):
    python = sys.executable if hub_version == "test venv" else client_venv(HUB_036)
    cfg = {
        "url": server.url,
        "prompt": PROMPT,
        "messages": MESSAGES,
        "adapters": list(ADAPTERS),
        "new_tokens": NEW_TOKENS,
    }
    proc = subprocess.run(
        [str(python), str(HUB_CLIENT), json.dumps(cfg)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    major = int(out["version"].split(".")[0])
    assert major >= 1 if hub_version == "test venv" else out["version"].startswith("0.36."), out["version"]

    sync = out["sync"]
    base_tokens = reference[None]["details"]["tokens"]
    assert sync["base_text"] == reference[None]["generated_text"]
    assert sync["base_stream_texts"] == [t["text"] for t in base_tokens]  # every token's text, specials too
    for adapter in ADAPTERS:
        got, ref = sync["adapters"][adapter], reference[adapter]
        ref_ids = [t["id"] for t in ref["details"]["tokens"]]
        assert got["generate"] == {
            "generated_text": ref["generated_text"],
            "finish_reason": ref["details"]["finish_reason"],
            "generated_tokens": ref["details"]["generated_tokens"],
            "token_ids": ref_ids,
        }, adapter
        assert got["stream_token_ids"] == ref_ids and got["stream_generated_text"] == ref["generated_text"]
        assert got["stream_finish_reason"] == ref["details"]["finish_reason"]
        assert got["chat"] == chat_reference[adapter] and got["chat_model"] == adapter
        assert got["chat_stream"] and "".join(got["chat_stream"]) == chat_reference[adapter]
    # Without `model=` the client sends "dummy": the base model.
    model_id = json.loads(get(server.url + "/info")[1])["model_id"]
    assert sync["default_chat"] == {"content": chat_reference[None], "model": model_id}
    errors = sync["errors"]
    for kind in ("generate", "stream"):
        assert errors[kind]["class"] == "ValidationError" and "not loaded" in errors[kind]["message"], errors
    assert errors["chat"]["class"] == "HfHubHTTPError" and errors["chat"]["status"] == 404, errors
    assert sync["health"] is True and sync["info_model_id"] == model_id

    asy = out["async"]
    ref = reference[asy["adapter"]]
    assert (
        asy["generate"]["token_ids"] == asy["stream_token_ids"] == [t["id"] for t in ref["details"]["tokens"]]
    )
    assert asy["chat"] == "".join(asy["chat_stream"]) == chat_reference[asy["adapter"]]
    assert asy["missing_adapter_error"] == "ValidationError"


def test_metrics_count_client_requests_per_adapter(server):
    """No client reads /metrics; scraped with prometheus_client's parser, the counters follow the requests."""

    def samples() -> dict[tuple[str, str], float]:
        status, text = get(server.url + "/metrics")
        assert status == 200
        return {
            (s.name, s.labels.get("adapter", "")): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
        }

    before = samples()
    lx = lorax.Client(server.url, timeout=120)
    for adapter in (*ADAPTERS, ADAPTERS[1]):
        lx.generate(PROMPT, adapter_id=adapter, max_new_tokens=2)
    after = samples()

    def moved(name: str, adapter: str) -> float:
        return after[(name, adapter)] - before.get((name, adapter), 0.0)

    for name in ("tgi_request_count_total", "tgi_request_success_total"):
        assert (moved(name, ADAPTERS[0]), moved(name, ADAPTERS[1])) == (1, 2), name
    assert moved("tgi_request_generated_tokens_sum", ADAPTERS[1]) == 4
