"""One generation in flight: its parameters, KV blocks, tokens so far, stop criteria and event queue.

The scheduler feeds each step's `Generation` to `Sequence.on_generation`; the sequence turns it into
events on `events` (an asyncio.Queue) that a consumer reads in order:

    PrefillEvent (only with prompt logprobs) -> TokenEvent per token -> EndEvent | ErrorEvent

A non-streaming route collects them into a `GenerationResult`; a stream forwards each TokenEvent.

Stopping, checked after every token in this order: an EOS token id ("eos_token"), a stop sequence
("stop_sequence"), max_new_tokens ("length"). Stop sequences are matched against the text of all
generated tokens (special tokens' text included, as TGI does), wherever they complete inside a token's
text. `generated_text` is the text of the non-special tokens; on a stop sequence it ends right after
the stop sequence (kept, as TGI keeps it), and text a token carried past it is cut.

A preempted sequence (router/scheduler.py) keeps its tokens, text and stop state here: when it is
admitted again, `to_pb` sends its prompt plus the tokens it already produced as a recompute, and the
token that prefill samples is simply its next one, so its events never repeat or skip a token.

A prefill longer than a step's prefill budget is sent in chunks (router/scheduler.py): `prefilled` of
its tokens are in the workers' cache, the next chunk ends at `chunk_end`, and while `prefilling` it
gets no token (only the last chunk samples one) and does not decode.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from proto import generate_pb2 as pb
from router.adapters import AdapterLease
from router.errors import ApiError
from router.tokenizer import IncrementalDetokenizer, ModelTokenizer


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class SequenceParams:
    """A sequence's request. The workers get the prompt, `sampling` (the message itself), the adapter slot
    with the load generation it must hold, and `prompt_logprobs`; `max_new_tokens` and `stop` are the
    router's stop criteria."""

    input_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: pb.SamplingParameters
    lora_slot: int = 0
    adapter_generation: int = 0  # 0 with slot 0
    stop: tuple[str, ...] = ()
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class GenerationResult:
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prompt_tokens: int
    prefill: tuple[Token, ...]
    tokens: tuple[Token, ...]
    top_tokens: tuple[tuple[Token, ...], ...]
    queue_s: float = 0.0
    inference_s: float = 0.0

    @property
    def mean_logprob(self) -> float:
        """best_of keeps the sequence with the highest mean token logprob (TGI)."""
        lps = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")


@dataclass(frozen=True)
class PrefillEvent:
    tokens: tuple[Token, ...]


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token: Token
    top_tokens: tuple[Token, ...]


@dataclass(frozen=True)
class EndEvent:
    result: GenerationResult


@dataclass(frozen=True)
class ErrorEvent:
    error: ApiError


Event = PrefillEvent | TokenEvent | EndEvent | ErrorEvent


@dataclass
class _StopMatcher:
    stops: tuple[str, ...]
    tail: str = ""  # the last (longest stop - 1) characters of generated text, special tokens included

    def feed(self, text: str) -> int | None:
        """Add a token's text; return how many of its characters end the earliest completed stop."""
        if not self.stops or not text:
            return None
        window = self.tail + text
        ends = []
        for stop in self.stops:
            i = window.find(stop, max(len(self.tail) - len(stop) + 1, 0))
            if i >= 0:
                ends.append(i + len(stop) - len(self.tail))
        keep = max(len(s) for s in self.stops) - 1
        self.tail = window[-keep:] if keep else ""
        return min(ends) if ends else None


@dataclass(eq=False)
class Sequence:
    id: int
    params: SequenceParams
    tokenizer: ModelTokenizer
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    status: Status = Status.WAITING
    cancelled: bool = False
    blocks: list[int] = field(default_factory=list)
    blocks_sent: int = 0  # how many of `blocks` the workers know (the rest go in the next Decode's `grown`)
    admission: int = 0  # admission order, counting re-admissions: the newest is preempted first
    preemptions: int = 0
    prefilling: bool = False  # admitted, and its prefill has chunks still to send
    prefilled: int = 0  # tokens of its prefill (to_pb's token_ids) the workers have cached
    chunk_end: int = 0  # where its next prefill chunk ends (the whole prefill when unchunked)
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # first admission (a re-admission after preemption keeps it)
    lease: AdapterLease | None = None  # the adapter's, released by the scheduler when it frees the sequence
    fair_client: tuple[str, str] = ("", "")  # (tenant, adapter) whose fairness counters it is charged to

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, list(self.params.input_ids))
        self._stops = _StopMatcher(tuple(s for s in self.params.stop if s))
        self._text: list[str] = []
        self._prefill: tuple[Token, ...] = ()
        self._tokens: list[Token] = []
        self._top: list[tuple[Token, ...]] = []

    @property
    def num_tokens(self) -> int:
        """Tokens in the KV cache once the sequence's next step has run: prompt + tokens generated so far
        (a decode writes the last one; the prefill of a recompute writes them all)."""
        return len(self.params.input_ids) + len(self._tokens)

    @property
    def max_tokens(self) -> int:
        """The most it can ever hold: prompt + max_new_tokens."""
        return len(self.params.input_ids) + self.params.max_new_tokens

    @property
    def prompt_len(self) -> int:
        return len(self.params.input_ids)

    @property
    def num_generated(self) -> int:
        return len(self._tokens)

    def to_pb(self) -> pb.NewSequence:
        """Its prefill's next chunk, [prefilled, chunk_end) of the prompt, or after a preemption of the
        prompt plus what it generated (a recompute); the whole of it when unchunked."""
        generated = [t.id for t in self._tokens]
        tokens = [*self.params.input_ids, *generated]
        return pb.NewSequence(
            request_id=self.id,
            token_ids=tokens[self.prefilled : self.chunk_end],
            num_cached=self.prefilled,
            more_chunks=self.chunk_end < len(tokens),
            block_table=self.blocks,
            lora_slot=self.params.lora_slot,
            adapter_generation=self.params.adapter_generation,
            parameters=self.params.sampling,
            prompt_logprobs=self.params.prompt_logprobs and not generated,  # already sent once
            num_generated=len(generated),
        )

    def on_generation(self, gen: pb.Generation) -> bool:
        """Record one step's token and emit its events; True when the sequence has finished."""
        if not self._tokens and self.params.prompt_logprobs:
            self._emit_prefill(list(gen.prompt_logprobs))
        tok = self.tokenizer
        text = self._detok.push(gen.token_id)
        token = Token(gen.token_id, text, gen.logprob, tok.is_special(gen.token_id))
        top = tuple(
            Token(i, tok.token_text(i), lp, tok.is_special(i))
            for i, lp in zip(gen.top_token_ids, gen.top_logprobs, strict=False)
            if lp != float("-inf")
        )
        self._tokens.append(token)
        self._top.append(top)
        self.events.put_nowait(TokenEvent(len(self._tokens) - 1, token, top))

        stop_end = self._stops.feed(text)
        if not token.special:
            self._text.append(text if stop_end is None else text[:stop_end])
        if gen.token_id in tok.eos_token_ids:
            reason = FinishReason.EOS_TOKEN
        elif stop_end is not None:
            reason = FinishReason.STOP_SEQUENCE
        elif len(self._tokens) >= self.params.max_new_tokens:
            reason = FinishReason.LENGTH
        else:
            return False
        self._finish(reason)
        return True

    def fail(self, error: ApiError) -> None:
        if self.status is not Status.FINISHED:
            self.status = Status.FINISHED
            self.events.put_nowait(ErrorEvent(error))

    def _emit_prefill(self, logprobs: list[float]) -> None:
        ids = self.params.input_ids
        # The first prompt token has no logprob (TGI sends null); token i + 1 has logprobs[i].
        lps: list[float | None] = [None, *logprobs[: len(ids) - 1]]
        lps += [None] * (len(ids) - len(lps))
        self._prefill = tuple(
            Token(i, self.tokenizer.token_text(i), lp) for i, lp in zip(ids, lps, strict=True)
        )
        self.events.put_nowait(PrefillEvent(self._prefill))

    def _finish(self, reason: FinishReason) -> None:
        if reason is not FinishReason.STOP_SEQUENCE:
            self._text.append(self._detok.flush())
        now = time.monotonic()
        admitted = self.admitted_at if self.admitted_at is not None else now
        sampling = self.params.sampling
        result = GenerationResult(
            generated_text="".join(self._text),
            finish_reason=reason,
            generated_tokens=len(self._tokens),
            seed=sampling.seed if sampling.do_sample else None,
            prompt_tokens=self.prompt_len,
            prefill=self._prefill,
            tokens=tuple(self._tokens),
            top_tokens=tuple(self._top),
            queue_s=admitted - self.queued_at,
            inference_s=now - admitted,
        )
        self.status = Status.FINISHED
        self.events.put_nowait(EndEvent(result))
