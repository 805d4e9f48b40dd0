"""/generate and POST /: response shapes, stopping, seeds, adapters, fan-out to ranks."""

from __future__ import annotations

import pytest

from tests.router.conftest import BASE_MODEL_ID, SCRIPTS
from tests.router.fake_worker import EOS_ID


async def test_generate_details_shape(start_router, encode):
    h = await start_router()
    resp = await h.generate("Hello", max_new_tokens=5, details=True)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    ids = encode(SCRIPTS[0])[:5]
    assert body["generated_text"] == SCRIPTS[0][:5]
    d = body["details"]
    assert d["finish_reason"] == "length"
    assert d["generated_tokens"] == 5
    assert d["seed"] is None  # greedy
    assert d["prompt_tokens"] == 1 + len("Hello")  # BOS + one token per byte
    assert d["prefill"] == []
    assert [t["id"] for t in d["tokens"]] == ids
    assert "".join(t["text"] for t in d["tokens"]) == SCRIPTS[0][:5]
    assert [t["logprob"] for t in d["tokens"]] == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
    assert all(t["special"] is False for t in d["tokens"])
    assert "top_tokens" not in d and "best_of_sequences" not in d
    assert resp.headers["x-generated-tokens"] == "5"
    assert resp.headers["x-prompt-tokens"] == "6"


async def test_without_details_only_text(start_router):
    h = await start_router()
    body = await (await h.generate("Hello", max_new_tokens=3)).json()
    assert body == {"generated_text": SCRIPTS[0][:3]}


async def test_compat_route_returns_array(start_router):
    h = await start_router()
    resp = await h.http.post(
        "/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}, "stream": False}
    )
    assert resp.status == 200
    body = await resp.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"] == SCRIPTS[0][:3]
    assert body[0]["details"]["generated_tokens"] == 3


async def test_eos_token_stops(start_router):
    h = await start_router()
    body = await (await h.generate("Hello", max_new_tokens=100, details=True)).json()
    d = body["details"]
    assert d["finish_reason"] == "eos_token"
    assert body["generated_text"] == SCRIPTS[0]  # the EOS token's text is not part of the output
    assert d["generated_tokens"] == len(SCRIPTS[0]) + 1
    assert d["tokens"][-1] == {
        "id": EOS_ID,
        "text": "</s>",
        "logprob": pytest.approx(d["tokens"][-1]["logprob"]),
        "special": True,
    }


async def test_stop_sequence_trims_after_it(start_router):
    h = await start_router()
    body = await (await h.generate("Hello", max_new_tokens=100, stop=["xyz", "world"], details=True)).json()
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"] == " hello world"
    assert body["details"]["generated_tokens"] == len(" hello world")


async def test_stop_sequence_inside_a_token_cuts_the_rest(start_router):
    # Adapter-two's script is byte-level too; check the earliest of several stops wins.
    h = await start_router()
    body = await (
        await h.generate(
            "Hi", max_new_tokens=100, stop=["two.", "two;"], adapter_id="adapter-two", details=True
        )
    ).json()
    assert body["generated_text"] == " two, two;"
    assert body["details"]["finish_reason"] == "stop_sequence"


async def test_max_new_tokens_default_fills_total(start_router):
    h = await start_router(fake={"num_blocks": 8, "block_size": 4})  # 32 tokens in total
    info = await (await h.http.get("/info")).json()
    assert info["max_total_tokens"] == 32 and info["max_input_tokens"] == 31
    body = await (await h.generate("abc", details=True)).json()
    # 4 prompt tokens leave 28 new tokens; the base script is shorter, so it ends with EOS.
    assert body["details"]["finish_reason"] == "eos_token"
    long_prompt = "x" * 20
    body = await (await h.generate(long_prompt, details=True)).json()
    assert body["details"]["finish_reason"] == "length"
    assert body["details"]["generated_tokens"] == 32 - 21


async def test_adapters_select_their_slot(start_router):
    h = await start_router()
    for adapter_id, slot in [
        ("org/adapter-one", 1),
        ("adapter-two", 2),
        (None, 0),
        ("", 0),
        (BASE_MODEL_ID, 0),
    ]:
        body = await (await h.generate("Hi", max_new_tokens=4, adapter_id=adapter_id)).json()
        assert body["generated_text"] == SCRIPTS[slot][:4], adapter_id
    slots = [s.lora_slot for r in h.fakes[0].requests("Prefill") for s in r.sequences]
    assert slots == [1, 2, 0, 0, 0]


async def test_rank0_reply_is_used_and_every_rank_gets_every_call(start_router):
    h = await start_router(world_size=2)
    body = await (await h.generate("Hello", max_new_tokens=3)).json()
    assert body["generated_text"] == SCRIPTS[0][:3]  # rank 1 answers other tokens
    await h.settle()
    methods = [[m for m, _ in f.calls if m != "Health"] for f in h.fakes]
    assert methods[0] == methods[1]
    assert methods[0][:2] == ["Info", "ClearCache"]
    assert methods[0].count("Prefill") == 1 and methods[0].count("Decode") == 2
    assert methods[0][-1] == "Release"
    assert h.fakes[0].sequences == {} and h.fakes[1].sequences == {}


async def test_sampling_seed_is_random_and_echoed(start_router):
    h = await start_router()
    body = await (await h.generate("Hi", max_new_tokens=2, do_sample=True, details=True)).json()
    seed = body["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    sent = h.fakes[0].requests("Prefill")[-1].sequences[0].parameters
    assert sent.do_sample and sent.seed == seed
    body = await (await h.generate("Hi", max_new_tokens=2, do_sample=True, seed=42, details=True)).json()
    assert body["details"]["seed"] == 42
    # A warper implies sampling (TGI); the neutral values are sent explicitly.
    await h.generate("Hi", max_new_tokens=2, top_k=5)
    sent = h.fakes[0].requests("Prefill")[-1].sequences[0].parameters
    assert sent.do_sample and sent.top_k == 5 and sent.temperature == 1.0 and sent.top_p == 1.0
    assert sent.repetition_penalty == 1.0 and sent.typical_p == 1.0


async def test_no_parameters_means_sampling_like_tgi(start_router):
    h = await start_router()
    resp = await h.http.post("/generate", json={"inputs": "Hi"})
    assert resp.status == 200
    assert h.fakes[0].requests("Prefill")[-1].sequences[0].parameters.do_sample


async def test_top_tokens_and_prefill_details(start_router, encode):
    h = await start_router()
    body = await (
        await h.generate("Hey", max_new_tokens=2, top_n_tokens=3, decoder_input_details=True)
    ).json()
    d = body["details"]  # decoder_input_details implies details
    assert len(d["top_tokens"]) == 2 and all(len(t) == 3 for t in d["top_tokens"])
    first = d["top_tokens"][0][0]
    assert first["id"] == d["tokens"][0]["id"] and set(first) == {"id", "text", "logprob", "special"}
    assert [t["id"] for t in d["prefill"]] == [1, *encode("Hey")]
    assert d["prefill"][0] == {"id": 1, "text": "<s>", "logprob": None}
    assert [t["logprob"] for t in d["prefill"][1:]] == [-0.5] * 3
    assert h.fakes[0].requests("Prefill")[-1].sequences[0].prompt_logprobs


async def test_return_full_text_prepends_inputs(start_router):
    h = await start_router()
    body = await (await h.generate("Hello", max_new_tokens=3, return_full_text=True)).json()
    assert body["generated_text"] == "Hello" + SCRIPTS[0][:3]


async def test_best_of_returns_best_and_others(start_router):
    h = await start_router()
    body = await (await h.generate("Hi", max_new_tokens=3, best_of=2, do_sample=True, details=True)).json()
    d = body["details"]
    assert len(d["best_of_sequences"]) == 1
    other = d["best_of_sequences"][0]
    assert set(other) >= {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    mean = lambda toks: sum(t["logprob"] for t in toks) / len(toks)  # noqa: E731
    assert mean(d["tokens"]) >= mean(other["tokens"])
    assert d["seed"] != other["seed"]
    await h.settle()
    assert len(h.fakes[0].requests("Release")) >= 1 and h.fakes[0].sequences == {}


async def test_extra_and_null_fields_are_accepted(start_router):
    """lorax-client's body: extra keys, explicit nulls, max_new_tokens null."""
    h = await start_router()
    parameters = {
        "adapter_id": "org/adapter-one", "adapter_source": "hub", "merged_adapters": None, "api_token": None,
        "do_sample": False, "max_new_tokens": None, "ignore_eos_token": False, "repetition_penalty": None,
        "return_full_text": False, "stop": [], "seed": None, "temperature": None, "top_k": None,
        "top_p": None, "truncate": None, "typical_p": None, "best_of": None, "watermark": False,
        "details": True, "decoder_input_details": False, "return_k_alternatives": None,
        "response_format": None,
    }  # fmt: skip
    resp = await h.http.post("/", json={"inputs": "Hello", "parameters": parameters, "stream": False})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body[0]["generated_text"] == SCRIPTS[1]
    assert body[0]["details"]["prompt_tokens"] == 6
