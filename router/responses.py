"""The JSON bodies the handlers build, as pydantic models: they document the responses in the OpenAPI
document (router/openapi.py), and tests validate real responses against them.

TGI's bodies forbid unknown fields, so a field the handlers add must be added here. The OpenAI bodies
list the fields clients rely on and allow others (they are OpenAI's types, documented upstream).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefillToken(_Response):
    id: int
    text: str
    logprob: float | None
    """null for the first prompt token."""


class Token(PrefillToken):
    special: bool


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class SequenceDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    """The sampling seed; null when decoding greedily."""
    prompt_tokens: int
    prefill: list[PrefillToken]
    """Prompt tokens with logprobs when `decoder_input_details` was set, else empty."""
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    """The `top_n_tokens` alternatives of each token; omitted when not requested."""


class BestOfSequence(SequenceDetails):
    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None
    """The other `best_of` sequences; omitted unless best_of > 1."""


class GenerateResponse(_Response):
    generated_text: str
    details: Details | None = None
    """Omitted unless `details` or `decoder_input_details` was set."""


class StreamDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int
    prompt_tokens: int


class StreamResponse(_Response):
    """One server-sent event (`data:<json>`) per token; an error after the stream started arrives as an
    ErrorResponse event instead."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    """The whole text, on the last event only."""
    details: StreamDetails | None
    """On the last event, when `details` was set."""


class SimpleToken(_Response):
    id: int
    text: str
    start: int
    """Offset of the token's first character in `inputs`."""
    stop: int


class ErrorResponse(_Response):
    error: str
    error_type: str


class AdapterInfo(_Response):
    id: str
    source: str
    """What LORA_ADAPTERS or the load route's lora_path said, or the id a first request used."""
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    state: Literal["loading", "resident", "not_resident", "unloading"]
    """`resident` while in a worker slot; a `not_resident` adapter is loaded again on its next request."""
    pinned: bool


class AdapterBytes(_Response):
    device: int
    """Its weights on rank 0 while resident (each rank holds its shard), else 0."""
    host: int
    """0: there is no host tier yet."""
    disk: int
    """Its adapter files' size."""


class AdapterStatus(_Response):
    name: str
    source: Literal["startup", "route", "root", "hf-cache", "hub-download"]
    origin: str
    """What was written: the LORA_ADAPTERS source, the lora_path, or the requested id."""
    path: str | None
    revision: str | None
    """The commit sha of an adapter from the HF cache or the Hub."""
    rank: int | None
    """LoRA rank (the largest over its modules), from its last load; null before one."""
    alpha: float | None
    target_modules: list[str]
    bytes: AdapterBytes
    state: Literal["loading", "resident", "not_resident", "unloading", "failed"]
    error: str | None
    """Why its last load failed, while that is remembered (`state` failed)."""
    pinned: bool
    requests_in_flight: int
    """Requests and sequences holding it (a best_of request counts each sequence)."""
    last_used: float | None
    """Unix time."""
    slot: int | None
    generation: int | None
    """The load generation in `slot`, while resident."""


class AdapterList(_Response):
    adapters: list[AdapterStatus]


class Info(_Response):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_top_n_tokens: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None
    max_client_batch_size: int
    num_shard: int
    kv_block_size: int
    kv_num_blocks: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    adapters: list[AdapterInfo]


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    code: str | None
    param: str | None


class OpenAIErrorResponse(_Response):
    """OpenAI's error envelope, plus TGI's `error_type`."""

    error: OpenAIErrorDetail
    error_type: str


# ---- OpenAI ------------------------------------------------------------------------------------


class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


OpenAIFinishReason = Literal["stop", "length"]


class _Completion(_OpenAI):
    id: str
    created: int
    model: str
    """The adapter id, or the base model's id."""
    system_fingerprint: str


class ChatMessageOut(_OpenAI):
    role: str
    content: str | None


class ChatChoice(_OpenAI):
    index: int
    message: ChatMessageOut
    logprobs: dict | None
    finish_reason: OpenAIFinishReason


class ChatCompletion(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_OpenAI):
    role: str
    content: str | None


class ChatChunkChoice(_OpenAI):
    index: int
    delta: ChatDelta
    logprobs: dict | None
    finish_reason: OpenAIFinishReason | None


class ChatCompletionChunk(_Completion):
    """One `data: <json>` event; the stream ends with `data: [DONE]`."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    """Present only with `stream_options.include_usage` (null until the last, usage-only chunk)."""


class CompletionChoice(_OpenAI):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: OpenAIFinishReason | None


class Completion(_Completion):
    """A completion, or one `data: <json>` event of a stream (ended by `data: [DONE]`)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None
    """Always on a completion; on stream events only with `stream_options.include_usage`."""


class Model(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None
    """The base model, for an adapter."""


class ModelList(_Response):
    object: Literal["list"]
    data: list[Model]
