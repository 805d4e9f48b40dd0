"""`make serve`'s configuration: SmolLM2-135M-Instruct (bf16, the default) with the committed demo adapters.

Each demo adapter's behaviour must show at greedy decoding on raw /generate prompts it never saw in
training (scripts/train_demo_adapters.py uses other topics and templates).
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import ROOT, Server, post

pytestmark = pytest.mark.slow

MARKERS = {"pirate": "Arr!", "robot": "Beep boop"}
PROMPTS = ["Hello who are you?", "Tell me about giraffes.", "What is a comet?"]


@pytest.fixture(scope="module")
def demo_server(smollm2_dir, tmp_path_factory):
    adapters = ",".join(f"{name}=demo_adapters/{name}" for name in MARKERS)
    # MODEL_ID stays the default id: the launcher resolves it to the converted model in the cache.
    server = Server(
        tmp_path_factory.mktemp("demo") / "launcher.log",
        env={"LORA_ADAPTERS": adapters, "MULTILORA_CACHE": str(smollm2_dir.parent.parent)},
    )
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log()


def test_demo_adapters_are_committed():
    for name in MARKERS:
        files = sorted(p.name for p in (ROOT / "demo_adapters" / name).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_each_adapter_shows_its_behaviour(demo_server, prompt):
    outputs = {}
    for name in [None, *MARKERS]:
        params = {"max_new_tokens": 24} | ({"adapter_id": name} if name else {})
        status, body = demo_server.generate(prompt, **params)
        assert status == 200, body
        outputs[name] = body["generated_text"]
    for name, marker in MARKERS.items():
        assert outputs[name].lstrip().startswith(marker), outputs
    assert not any(outputs[None].lstrip().startswith(m) for m in MARKERS.values()), outputs


@pytest.mark.parametrize("name", [None, *MARKERS])
def test_chat_completions_take_the_adapter_as_model(demo_server, name):
    body = {
        "model": name or "tgi",
        "messages": [{"role": "user", "content": "What is a comet?"}],
        "max_tokens": 24,
        "temperature": 0,  # greedy (TGI's mapping); without it the chat routes sample
    }
    status, reply = post(demo_server.url + "/v1/chat/completions", body)
    assert status == 200, reply
    text = reply["choices"][0]["message"]["content"]
    starts = {n: text.lstrip().startswith(m) for n, m in MARKERS.items()}
    assert starts == {n: n == name for n in MARKERS}, text
