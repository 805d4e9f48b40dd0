"""What a step is asked for and returns, and the execution state the runner keeps per sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.sampler import SamplingParams, SequenceSamplingState


@dataclass
class PrefillRequest:
    request_id: int
    token_ids: list[int]
    block_table: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    lora_slot: int = 0
    prompt_logprobs: bool = False
    adapter_generation: int = 0  # the load generation expected in lora_slot (0 with slot 0)
    num_generated: int = 0  # a recompute: the last num_generated token_ids are its own earlier output
    # Chunked prefill: a chunk after the first continues the sequence after its num_cached cached tokens;
    # every chunk but the last has more_chunks (it samples nothing).
    num_cached: int = 0
    more_chunks: bool = False


@dataclass
class TokenOutput:
    request_id: int
    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    prompt_logprobs: list[float] | None = None  # logprob of prompt token i+1 given tokens <= i


@dataclass
class SequenceState:
    """One sequence's execution state on this rank (its blocks and adapter slot are the router's)."""

    block_table: list[int]
    lora_slot: int
    adapter_generation: int  # of lora_slot at its prefill; checked again on every step
    params: SamplingParams
    sampling: SequenceSamplingState | None  # None while its prefill is still coming in chunks
    num_cached: int  # tokens whose K/V are in the cache
    last_token: int  # sampled, not yet in the cache
    # While prefilling in chunks: the tokens so far (the sampler's state is made from them all at the
    # last chunk, as from an unchunked prompt), their prompt logprobs, and, with prompt logprobs, the
    # last chunk row's logits [1, vocab], whose next token comes with the next chunk.
    prompt_ids: list[int] = field(default_factory=list)
    prompt_lps: list[float] = field(default_factory=list)
    pending_logits: torch.Tensor | None = None

    @property
    def prefilling(self) -> bool:
        return self.sampling is None


@dataclass
class StepSequences:
    """A step's sequences in row order: the new ones' prompt rows first, then a row per running one."""

    new: list[PrefillRequest]
    running_ids: list[int]
    running: list[SequenceState]
