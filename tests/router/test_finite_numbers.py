"""Non-finite numbers (`NaN`, `Infinity`, `-Infinity`: Python's json and many clients write them) in any
numeric parameter of any HTTP generation route: a 422 naming the field, and nothing reaches a worker.
The public gRPC API's doubles are tested in test_public_grpc.py."""

from __future__ import annotations

import types
import typing

import pytest

from router.openai_schemas import ChatCompletionRequest, CompletionRequest
from router.schemas import GenerateParameters

NON_FINITE = ["NaN", "Infinity", "-Infinity"]

TGI_FIELDS = [
    "best_of",
    "frequency_penalty",
    "max_new_tokens",
    "repetition_penalty",
    "return_k_alternatives",
    "seed",
    "temperature",
    "top_k",
    "top_n_tokens",
    "top_p",
    "truncate",
    "typical_p",
]
OPENAI_FIELDS = [
    "frequency_penalty",
    "n",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "temperature",
    "top_k",
    "top_p",
]
CHAT_FIELDS = [*OPENAI_FIELDS, "logprobs", "max_completion_tokens", "max_tokens", "top_logprobs"]
COMPLETION_FIELDS = [*OPENAI_FIELDS, "best_of", "logprobs", "max_tokens"]

# A body for each route with `{field}: {value}` as raw JSON text (json.dumps would refuse NaN).
TGI_BODY = '{{"inputs": "Hi", "parameters": {{"max_new_tokens": 2, "{field}": {value}}}}}'
CHAT_BODY = '{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 2, "{field}": {value}}}'
COMPLETION_BODY = '{{"prompt": "hi", "max_tokens": 2, "{field}": {value}}}'

CASES = [(route, TGI_BODY, field) for route in ("/generate", "/generate_stream", "/") for field in TGI_FIELDS]
CASES += [("/v1/chat/completions", CHAT_BODY, field) for field in CHAT_FIELDS]
CASES += [("/v1/completions", COMPLETION_BODY, field) for field in COMPLETION_FIELDS]


def _numeric_fields(model) -> set[str]:
    def numeric(annotation) -> bool:
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            return any(numeric(a) for a in typing.get_args(annotation))
        return annotation in (int, float)

    return {name for name, f in model.model_fields.items() if numeric(f.annotation)}


def test_the_cases_cover_every_numeric_field():
    assert set(TGI_FIELDS) == _numeric_fields(GenerateParameters)
    # Chat's `logprobs` is a boolean, where a number is as wrong as anywhere else.
    assert set(CHAT_FIELDS) == _numeric_fields(ChatCompletionRequest) | {"logprobs"}
    assert set(COMPLETION_FIELDS) == _numeric_fields(CompletionRequest)


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(("route", "template", "field"), CASES, ids=[f"{r}:{f}" for r, _, f in CASES])
async def test_non_finite_number_is_422_naming_the_field(start_router, route, template, field, value):
    h = await start_router(world_size=1)
    body = template.format(field=field, value=value)
    resp = await h.http.post(route, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 422, await resp.text()
    error = await resp.json()
    assert error["error_type"] == "validation"
    message = error["error"] if route in ("/generate", "/generate_stream", "/") else error["error"]["message"]
    where = f"parameters.{field}" if template is TGI_BODY else field
    assert message.startswith("Failed to deserialize the JSON body into the target type: ")
    assert f"{where}: " in message, message
    assert not [m for m, _ in h.fakes[0].calls if m in ("Prefill", "Decode")]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_non_finite_logit_bias_is_refused(start_router, route, value):
    h = await start_router(world_size=1)
    template = CHAT_BODY if route == "/v1/chat/completions" else COMPLETION_BODY
    body = template.format(field="logit_bias", value=f'{{"5": {value}}}')
    resp = await h.http.post(route, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 422
    assert (await resp.json())["error"]["param"] == "logit_bias"
    assert not [m for m, _ in h.fakes[0].calls if m in ("Prefill", "Decode")]
