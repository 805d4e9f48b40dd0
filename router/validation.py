"""TGI's request validation: the same checks, order and messages (router/src/validation.rs).

Checks run in TGI's order, so the first failing one gives the message TGI gives: best_of and sampling,
temperature, repetition_penalty, frequency_penalty, top_p, typical_p, top_k, max_new_tokens, stop, seed,
top_n_tokens, empty inputs, truncate, then (after tokenizing) total tokens before input length. The
adapter is not validation's business: router/lifecycle.py resolves it after these checks (an unknown id
is a 422 there, where TGI silently serves the base model) and sets the sequences' slot and generation.
The sampling fields become the proto message the workers get.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import generate_pb2 as pb
from router.errors import ValidationError
from router.limits import Limits
from router.schemas import GenerateParameters, GenerateRequest
from router.sequence import SequenceParams
from router.tokenizer import ModelTokenizer

_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class ValidRequest:
    inputs: str
    params: SequenceParams  # seed left at 0 when the request gave none (see `seed`); slot 0
    seed: int | None
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool


class Validator:
    def __init__(self, limits: Limits, tokenizer: ModelTokenizer):
        self.limits = limits
        self.tokenizer = tokenizer

    def validate(
        self, request: GenerateRequest, *, stream: bool = False, add_special_tokens: bool = True
    ) -> ValidRequest:
        """`request`, whatever its `adapter_id` says (the parameters name the base model's slot 0).

        `add_special_tokens=False` for inputs that already hold them (a rendered chat template)."""
        p = request.parameters
        lim = self.limits

        best_of = 1 if p.best_of is None else p.best_of
        if stream and best_of != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if stream and p.decoder_input_details:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
        if best_of < 1 or best_of > lim.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {lim.max_best_of}. Given: {best_of}")
        warpers = any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
        if best_of > 1 and not (p.do_sample or warpers):
            raise ValidationError("you must use sampling when `best_of` is > 1")

        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > lim.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {lim.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is not None:
            if best_of > 1:
                raise ValidationError("`seed` must not be set when `best_of` > 1")
            if not 0 <= p.seed <= _U64_MAX:
                raise ValidationError(f"`seed` must be >= 0 and <= {_U64_MAX}. Given: {p.seed}")
        top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
        if not 0 <= top_n_tokens <= lim.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {lim.max_top_n_tokens}. Given: {top_n_tokens}"
            )
        if p.grammar is not None:
            raise ValidationError("grammar is not supported")
        if p.watermark:
            raise ValidationError("`watermark` is not supported by this server")
        _refuse_lorax_extras(p)
        if not request.inputs:
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and not 0 < p.truncate <= lim.max_input_tokens:
            raise ValidationError(
                "`truncate` must be strictly positive and less than "
                f"{lim.max_input_tokens}. Given: {p.truncate}"
            )

        try:
            input_ids = self.tokenizer.encode(
                request.inputs, truncate=p.truncate, add_special_tokens=add_special_tokens
            )
        except Exception as e:
            raise ValidationError(f"tokenizer error {e}") from e
        n_in = len(input_ids)
        if n_in == 0:
            raise ValidationError("`inputs` cannot be empty")
        max_new = lim.max_total_tokens - n_in if p.max_new_tokens is None else p.max_new_tokens
        if n_in + max_new > lim.max_total_tokens or max_new <= 0:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {lim.max_total_tokens}. "
                f"Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if n_in > lim.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {lim.max_input_tokens} tokens. Given: {n_in}"
            )

        sampling = pb.SamplingParameters(
            do_sample=p.do_sample or _warps(temperature, p.top_k, p.top_p, p.typical_p),
            temperature=temperature,
            top_k=p.top_k or 0,
            top_p=1.0 if p.top_p is None else p.top_p,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            seed=p.seed or 0,
            top_n_tokens=top_n_tokens,
        )
        return ValidRequest(
            inputs=request.inputs,
            params=SequenceParams(
                input_ids=tuple(input_ids),
                max_new_tokens=max_new,
                sampling=sampling,
                stop=tuple(p.stop),
                prompt_logprobs=p.decoder_input_details,
            ),
            seed=p.seed,
            best_of=best_of,
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=bool(p.return_full_text),
        )


def _refuse_lorax_extras(p: GenerateParameters) -> None:
    """lorax-client's parameters this server does not implement: a request that sets one fails."""
    if p.merged_adapters is not None:
        raise ValidationError(
            "`merged_adapters` is not supported by this server; pass one loaded `adapter_id`"
        )
    if p.response_format is not None:
        raise ValidationError("`response_format` is not supported by this server")
    if p.ignore_eos_token:
        raise ValidationError("`ignore_eos_token` is not supported by this server")
    if p.return_k_alternatives:
        raise ValidationError("`return_k_alternatives` is not supported by this server; use `top_n_tokens`")


def _warps(temperature: float, top_k: int | None, top_p: float | None, typical_p: float | None) -> bool:
    """TGI's shard samples when a warper changes the distribution (temperature 1.0 alone does not)."""
    return temperature != 1.0 or bool(top_k) or top_p is not None or typical_p is not None
