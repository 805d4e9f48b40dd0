"""TGI streaming (/generate_stream, POST / with stream): framing, events, errors, disconnects, headers."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from router import stream
from tests.router.conftest import SCRIPTS
from tests.router.fake_worker import EOS_ID


def f32(x: float) -> float:
    """A logprob as it arrives from the worker (a proto float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def events(raw: bytes) -> list[dict]:
    """The JSON of each event of a TGI stream, checking the framing: `data:<json>` + blank line each."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-40:]
    chunks = [c for c in text[:-2].split("\n\n") if c != ":"]  # keep-alive comments aside
    assert all(c.startswith("data:{") and "\n" not in c for c in chunks), chunks
    return [json.loads(c.removeprefix("data:")) for c in chunks]


async def stream_body(h, inputs="Hi", path="/generate_stream", **parameters):
    resp = await h.http.post(path, json={"inputs": inputs, "parameters": parameters})
    assert resp.status == 200, await resp.text()
    return resp, await resp.read()


async def test_framing_is_byte_exact(start_router, encode):
    h = await start_router()
    resp, raw = await stream_body(h, "Hello", max_new_tokens=3)
    ids = encode(SCRIPTS[0])[:3]
    expected = []
    for i, (tid, ch) in enumerate(zip(ids, SCRIPTS[0], strict=False)):
        last = i == 2
        generated = json.dumps(SCRIPTS[0][:3]) if last else "null"
        expected.append(
            f'data:{{"index":{i + 1},"token":{{"id":{tid},"text":{json.dumps(ch)},'
            f'"logprob":{f32(-(i + 1) / 10)!r},"special":false}},'
            f'"generated_text":{generated},"details":null}}\n\n'
        )
    assert raw.decode() == "".join(expected)
    assert b"[DONE]" not in raw
    assert resp.content_type == "text/event-stream"


async def test_final_event_details_and_eos(start_router):
    h = await start_router()
    _, raw = await stream_body(h, "Hello", max_new_tokens=100, details=True)
    evs = events(raw)
    assert len(evs) == len(SCRIPTS[0]) + 1
    assert [e["index"] for e in evs] == list(range(1, len(evs) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
    last = evs[-1]
    assert last["token"]["id"] == EOS_ID and last["token"]["special"] is True
    assert last["generated_text"] == SCRIPTS[0]
    assert last["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": len(SCRIPTS[0]) + 1,
        "seed": None,
        "input_length": 6,
        "prompt_tokens": 6,
    }
    assert "".join(e["token"]["text"] for e in evs if not e["token"]["special"]) == SCRIPTS[0]


async def test_compat_route_streams_the_same(start_router):
    h = await start_router()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}}
    raw_a = await (await h.http.post("/generate_stream", json=body)).read()
    resp = await h.http.post("/", json={**body, "stream": True})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert events(await resp.read()) == events(raw_a)


async def test_stream_parameters(start_router):
    h = await start_router()
    # top_n_tokens, sampling with an echoed seed, return_full_text, an adapter, a stop sequence.
    _, raw = await stream_body(
        h,
        "Hi",
        max_new_tokens=50,
        top_n_tokens=2,
        do_sample=True,
        seed=7,
        return_full_text=True,
        adapter_id="adapter-two",
        stop=["two;"],
        details=True,
    )
    evs = events(raw)
    assert all(len(e["top_tokens"]) == 2 for e in evs)
    assert evs[0]["top_tokens"][0]["id"] == evs[0]["token"]["id"]
    last = evs[-1]
    assert last["generated_text"] == "Hi" + " two, two;"
    assert last["details"]["finish_reason"] == "stop_sequence"
    assert last["details"]["seed"] == 7
    sent = h.fakes[0].requests("Prefill")[-1].sequences[0]
    assert sent.lora_slot == 2 and sent.parameters.seed == 7 and sent.parameters.top_n_tokens == 2
    # Without top_n_tokens the key is left out, as TGI leaves it out.
    _, raw = await stream_body(h, max_new_tokens=2)
    assert all("top_tokens" not in e for e in events(raw))


async def test_sampling_without_seed_gets_a_random_one(start_router):
    h = await start_router()
    _, raw = await stream_body(h, max_new_tokens=2, do_sample=True, details=True)
    seed = events(raw)[-1]["details"]["seed"]
    assert isinstance(seed, int) and h.fakes[0].requests("Prefill")[-1].sequences[0].parameters.seed == seed


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
        ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported when streaming"),
        ({"adapter_id": "nope"}, "adapter `nope` is not loaded"),
        ({"watermark": True}, "`watermark` is not supported by this server"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ],
)
async def test_validation_errors_are_json_before_the_stream(start_router, parameters, message):
    h = await start_router()
    resp = await h.http.post("/generate_stream", json={"inputs": "Hi", "parameters": parameters})
    assert resp.status == 422 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["error_type"] == "validation" and message in body["error"], body
    assert h.fakes[0].requests("Prefill") == []


async def test_overloaded_stream_is_429(start_router):
    h = await start_router(max_concurrent_requests=1)
    h.fakes[0].step_delay = 0.01
    first = await h.http.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 30}})
    assert first.status == 200
    second = await h.http.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert second.status == 429 and (await second.json())["error_type"] == "overloaded"
    events(await first.read())
    third = await h.http.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert third.status == 200
    await third.read()


async def test_error_mid_stream_is_an_event(start_router):
    h = await start_router()
    for f in h.fakes:
        f.fail_at_token = 4  # the third Decode: tokens 1 (prefill), 2 and 3 arrive first
    _, raw = await stream_body(h, max_new_tokens=10, details=True)
    evs = events(raw)
    assert [e["index"] for e in evs[:-1]] == [1, 2, 3]
    assert evs[-1] == {
        "error": evs[-1]["error"],
        "error_type": "generation",
    }
    assert evs[-1]["error"].startswith("Request failed during generation: ")
    assert "injected failure" in evs[-1]["error"]
    await h.settle()
    for f in h.fakes:
        f.fail_at_token = None
    _, raw = await stream_body(h, max_new_tokens=2)
    assert events(raw)[-1]["generated_text"] == SCRIPTS[0][:2]


async def test_client_disconnect_mid_stream_frees_blocks(start_router):
    h = await start_router(world_size=2)
    for f in h.fakes:
        f.step_delay = 0.01
    sched = h.state.scheduler
    resp = await h.http.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 200}})
    assert resp.status == 200
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b'data:{"index":1,')
    await resp.content.readuntil(b"\n\n")
    (seq,) = sched.running
    assert sched.blocks.num_free < sched.blocks.num_blocks
    resp.close()  # the client goes away mid-stream
    await h.settle()
    assert sched.blocks.num_free == sched.blocks.num_blocks
    for f in h.fakes:
        assert [list(r.request_ids) for r in f.requests("Release")] == [[seq.id]]
        assert f.sequences == {}
    assert len(h.fakes[0].requests("Decode")) < 100
    assert h.state.concurrency.in_use == 0
    _, raw = await stream_body(h, max_new_tokens=2)
    assert len(events(raw)) == 2


async def test_keepalive_comment_while_waiting(start_router, monkeypatch):
    monkeypatch.setattr(stream, "KEEPALIVE_S", 0.02)
    h = await start_router(world_size=1)
    h.fakes[0].step_delay = 0.1
    _, raw = await stream_body(h, max_new_tokens=2)
    assert b":\n\n" in raw
    assert [e["index"] for e in events(raw)] == [1, 2]


async def test_stream_headers(start_router):
    h = await start_router()
    resp, _ = await stream_body(h, "Hello", max_new_tokens=2)
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["x-compute-type"] == "cpu"
    assert resp.headers["x-compute-characters"] == "5"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["x-prompt-tokens"] == "6"
    assert int(resp.headers["x-validation-time"]) >= 0


async def test_generate_headers(start_router):
    h = await start_router()
    resp = await h.generate("Hello", max_new_tokens=3)
    hd = resp.headers
    assert hd["x-compute-type"] == "cpu"
    assert float(hd["x-compute-time"]) > 0
    assert hd["x-compute-characters"] == "5"
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert int(hd[name]) >= 0, name
    assert int(hd["x-total-time"]) >= int(hd["x-inference-time"])
    assert hd["x-prompt-tokens"] == "6" and hd["x-generated-tokens"] == "3"


async def test_concurrent_streams_with_different_adapters(start_router):
    h = await start_router()
    for f in h.fakes:
        f.step_delay = 0.005
    adapters = [None, "org/adapter-one", "adapter-two"]
    raws = await asyncio.gather(*(stream_body(h, max_new_tokens=6, adapter_id=a) for a in adapters))
    texts = [events(raw)[-1]["generated_text"] for _, raw in raws]
    assert texts == [SCRIPTS[0][:6], SCRIPTS[1][:6], SCRIPTS[2][:6]]
