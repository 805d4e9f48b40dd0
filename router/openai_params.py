"""OpenAI request parameters to TGI's: what the OpenAI routes refuse, and the GenerateParameters the rest
becomes (router/openai_routes.py describes the mapping).

Each refusal is an OpenAIError naming its parameter, raised in the order the handlers call these checks.
"""

from __future__ import annotations

from router.openai_schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, OpenAIError
from router.schemas import GenerateParameters

# TGI's default --max-client-batch-size: prompts per /v1/completions call.
MAX_CLIENT_BATCH_SIZE = 4
# OpenAI's default max_tokens for the legacy completions endpoint.
COMPLETIONS_MAX_TOKENS = 16


def chat_top_n(body: ChatCompletionRequest, max_top_n_tokens: int) -> int:
    """The chat-only refusals; the alternatives per token (`top_logprobs`, with `logprobs` only)."""
    if body.tools:
        raise OpenAIError("tools are not supported by this server", "tools")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise OpenAIError('only `response_format: {"type": "text"}` is supported', "response_format")
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError("`top_logprobs` requires `logprobs: true`", "top_logprobs")
    return _top_n((body.top_logprobs or 0) if body.logprobs else 0, max_top_n_tokens, "top_logprobs")


def completion_prompts(body: CompletionRequest, max_top_n_tokens: int) -> tuple[list[str], int]:
    """The completions-only refusals; the prompts and the alternatives per token (`logprobs`)."""
    if body.suffix is not None:
        raise OpenAIError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix"
        )
    if body.echo:
        raise OpenAIError("`echo` is not supported by this server", "echo")
    if body.best_of not in (None, 1):
        raise OpenAIError("`best_of` must be 1 on /v1/completions", "best_of")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise OpenAIError("`prompt` cannot be an empty list", "prompt")
    if len(prompts) > MAX_CLIENT_BATCH_SIZE:
        raise OpenAIError(
            f"Number of prompts exceeds the maximum allowed batch size of {MAX_CLIENT_BATCH_SIZE}", "prompt"
        )
    return prompts, _top_n(body.logprobs or 0, max_top_n_tokens, "logprobs")


def parameters(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, top_n: int
) -> GenerateParameters:
    """The refusals both routes share, then TGI's parameters (the adapter is chosen by `model`)."""
    if body.n not in (None, 1):
        raise OpenAIError("`n` must be 1: this server returns one choice per prompt", "n")
    if body.presence_penalty:
        raise OpenAIError("`presence_penalty` is not supported by this server", "presence_penalty")
    if body.logit_bias:
        raise OpenAIError("`logit_bias` is not supported by this server", "logit_bias")
    if max_tokens is not None and max_tokens <= 0:
        raise OpenAIError("`max_tokens` must be strictly positive", "max_tokens")
    greedy = body.temperature == 0
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        top_p=None if body.top_p == 1.0 else body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        max_new_tokens=max_tokens,
        stop=stops(body.stop),
        seed=body.seed,
        top_n_tokens=top_n,
    )


def stops(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def template_message(m: ChatMessage) -> dict:
    """A message as the template sees it; text content parts are joined into one string (as TGI does)."""
    out = m.model_dump()
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError("only text content parts are supported", "messages")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


def _top_n(n: int, limit: int, param: str) -> int:
    if not 0 <= n <= limit:
        raise OpenAIError(f"`{param}` must be >= 0 and <= {limit}. Given: {n}", param)
    return n
