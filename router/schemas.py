"""TGI's request bodies as pydantic models, and the JSON shapes of its responses.

Requests accept what real clients send: unknown keys are ignored (lorax's `api_token`) and an explicit
`null` means "use the default". lorax's `adapter_source` ("local": the adapter roots, "hub": the HF
cache and the Hub) narrows where an adapter that is not registered yet is looked for; a registered name
is used whatever it says.
lorax-client's features this server lacks (`merged_adapters`, `response_format`, `ignore_eos_token`,
`return_k_alternatives`) are parsed so that validation can refuse them when set, not silently ignore
them. Types are strict (no "20" for 20), as in TGI's serde types, and numbers are finite: Python's json
and many clients send `NaN`, `Infinity` and `-Infinity`, which serde refuses and no sampling parameter
means. `RequestBody` carries these rules for the OpenAI bodies too (router/openai_schemas.py).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic import ValidationError as PydanticValidationError

from router.sequence import GenerationResult, Token


class RequestBody(BaseModel):
    """A request body's rules: unknown keys ignored, `null` is the default, strict types, finite numbers."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def nulls_mean_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


def problems(e: PydanticValidationError) -> str:
    """A body's validation errors as one line, each led by the field's path (`parameters.top_p: ...`)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())


class GenerateParameters(RequestBody):
    adapter_id: str | None = None
    adapter_source: str | None = None
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = []
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    # lorax-client's, refused when set (router/validation.py).
    merged_adapters: Any = None
    response_format: Any = None
    ignore_eos_token: bool = False
    return_k_alternatives: int | None = None


# TGI: a body without `parameters` samples (`default_parameters()` sets do_sample), one with them does not.
DEFAULT_PARAMETERS = GenerateParameters(do_sample=True)


class GenerateRequest(RequestBody):
    inputs: str
    parameters: GenerateParameters = DEFAULT_PARAMETERS


class CompatGenerateRequest(GenerateRequest):
    """`POST /`: a GenerateRequest plus `stream`."""

    stream: bool = False


# ---- responses ----------------------------------------------------------------------------------


def _number(x: float | None) -> float | None:
    """JSON has no NaN or infinity; such logprobs (e.g. the first prompt token's) become null."""
    return x if x is not None and math.isfinite(x) else None


def token_json(t: Token, with_special: bool = True) -> dict:
    out: dict[str, Any] = {"id": t.id, "text": t.text, "logprob": _number(t.logprob)}
    if with_special:
        out["special"] = t.special
    return out


def details_json(r: GenerationResult, prefill: bool) -> dict:
    out: dict[str, Any] = {
        "finish_reason": r.finish_reason.value,
        "generated_tokens": r.generated_tokens,
        "seed": r.seed,
        "prompt_tokens": r.prompt_tokens,  # not in TGI; lorax-client requires it
        "prefill": [token_json(t, with_special=False) for t in r.prefill] if prefill else [],
        "tokens": [token_json(t) for t in r.tokens],
    }
    if any(r.top_tokens):
        out["top_tokens"] = [[token_json(t) for t in top] for top in r.top_tokens]
    return out


def generate_response_json(
    best: GenerationResult,
    others: list[GenerationResult],
    *,
    details: bool,
    prefill: bool,
    prefix: str = "",
) -> dict:
    """TGI's GenerateResponse; `prefix` is the prompt when return_full_text is set."""
    out: dict[str, Any] = {"generated_text": prefix + best.generated_text}
    if details:
        out["details"] = details_json(best, prefill)
        if others:
            out["details"]["best_of_sequences"] = [
                {"generated_text": prefix + r.generated_text, **details_json(r, prefill)} for r in others
            ]
    return out


# ---- adapter management (router/adapter_api.py) ----------------------------------------------------


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's body (its other keys, such as `load_inplace`, are ignored), plus SGLang's `pinned`."""

    lora_name: str
    """The name requests will use as `adapter_id` (or OpenAI `model`)."""
    lora_path: str
    """A directory inside an adapter root (LORA_ADAPTER_ROOTS), or a Hugging Face repo id."""
    pinned: bool = False
    """Never evicted (until unloaded)."""


class UnloadLoraAdapterRequest(RequestBody):
    lora_name: str
