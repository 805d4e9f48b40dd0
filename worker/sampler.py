"""Per-sequence token selection for a batch: penalties, warpers, greedy or seeded sampling, logprobs.

Semantics follow TGI's `HeterogeneousNextTokenChooser` (itself built on the transformers logits
processors), applied row by row with each row's own `SamplingParams`:

1. repetition penalty (HF/CTRL: every token id present in the sequence so far, prompt included, has
   its logit divided by the penalty when positive and multiplied by it when negative);
2. frequency penalty (OpenAI: `logit -= penalty * count`, count over the sequence so far);
3. only for rows with `do_sample`: temperature, top-k, top-p, typical-p, then one draw from the
   row's own seeded generator. Greedy rows take the argmax of the penalised logits.

Reported logprobs (chosen token and top-n alternatives) are the log-softmax of the final processed
distribution the choice was made from; for greedy rows that is the penalised logits.

Each processor runs as one vectorised op over the rows that use it and is skipped when no row does.
The only Python loop that touches tensors draws one uniform per sampling row from that row's own
CPU generator; the draws themselves (inverse CDF) are one batched op. So a row's token depends only
on its own logits, params and seed, never on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
# Token id used to pad `SampleOutput.top_token_ids`; its logprob is -inf.
PAD_TOKEN_ID = -1
_SEED_MAX = 2**64 - 1


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence chooses its tokens (TGI `GenerateParameters` after router defaults).

    Neutral values switch a processor off: top_k 0, top_p 1, typical_p 1, repetition_penalty 1,
    frequency_penalty 0. Temperature and the warpers only apply when `do_sample` is set; mapping
    TGI's "any warper set implies sampling" rule onto `do_sample` is the router's job.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    top_n_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if _check_real("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _check_int("top_k", self.top_k, 0)
        for name in ("top_p", "typical_p"):
            value = _check_real(name, getattr(self, name))
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if _check_real("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check_real("frequency_penalty", self.frequency_penalty)
        _check_int("seed", self.seed, 0, _SEED_MAX)
        _check_int("top_n_tokens", self.top_n_tokens, 0)

    @property
    def uses_penalties(self) -> bool:
        """Whether token counts of the sequence are needed (repetition or frequency penalty on)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


class SequenceSamplingState:
    """What persists for one sequence across steps: its random generator and its token counts.

    - `generator`: a CPU `torch.Generator` seeded from `params.seed`. Each sampling step draws exactly
      one float64 uniform from it, so a request's tokens depend only on its own logits, params and
      seed: never on the rest of the batch, its position in it, or the device.
    - counts (only when a penalty is on): a dense [vocab] float32 vector on the logits' device, built
      once from the prompt at the first step, when the vocab size and device become known. After
      that a step costs O(1) per sequence. While the sequence is in a `Sampler`'s batch the vector is
      a row view of that sampler's batch count matrix, so the batch is read and updated in one op.
    """

    __slots__ = ("params", "generator", "_pending_ids", "_counts")

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int] | torch.Tensor) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)
        self._counts: torch.Tensor | None = None  # [vocab] float32, created by counts()
        # Token ids seen before the counts exist (prompt, then any early appends); CPU int64 chunks.
        self._pending_ids: list[torch.Tensor] = []
        if params.uses_penalties:
            self._pending_ids.append(torch.as_tensor(prompt_token_ids, dtype=torch.int64).reshape(-1).cpu())

    def skip_draws(self, num_steps: int) -> None:
        """Advance the generator past `num_steps` earlier sampling steps (a sequence recomputed after
        preemption, whose earlier tokens come with its prompt), so its next draw is the one it would
        have made uninterrupted. One float64 draw at a time, exactly as `Sampler.__call__` draws."""
        if self.params.do_sample:
            for _ in range(num_steps):
                torch.rand(1, generator=self.generator, dtype=torch.float64)

    def append(self, token_id: int | torch.Tensor) -> None:
        """Count one new token of the sequence. `Sampler.__call__` already does this for its choices.

        `token_id` is an int or a one-element int64 tensor (which may stay on the device: no sync).
        """
        if not self.params.uses_penalties:
            return
        if self._counts is None:
            self._pending_ids.append(torch.as_tensor(token_id, dtype=torch.int64).reshape(1).cpu())
        else:
            self._counts[torch.as_tensor(token_id, device=self._counts.device).reshape(1)] += 1.0

    def counts(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[vocab_size] float32: how often each token id occurs in the sequence so far."""
        if not self.params.uses_penalties:
            raise ValueError("token counts are only kept for params with a repetition or frequency penalty")
        if self._counts is None:
            ids = torch.cat(self._pending_ids)  # [num_tokens_so_far] CPU
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
            # Counted on the device: moving the ids is far cheaper than moving a [vocab] vector.
            self._counts = torch.bincount(ids.to(device), minlength=vocab_size).float()  # [vocab]
            self._pending_ids = []
        elif self._counts.numel() != vocab_size:
            raise ValueError(f"vocab size changed from {self._counts.numel()} to {vocab_size}")
        return self._counts


@dataclass
class SampleOutput:
    """One step's choice for every row.

    Rows asking for fewer than `max_top_n` alternatives (or whose processed distribution has fewer
    tokens of nonzero probability) are padded on the right with token id `PAD_TOKEN_ID` (-1) and
    logprob -inf. Alternatives are exact top-n in descending logprob order (TGI's tie expansion is
    not reproduced).
    """

    token_ids: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor  # [batch] float32, logprob of the chosen token
    top_token_ids: torch.Tensor  # [batch, max_top_n] int64
    top_logprobs: torch.Tensor  # [batch, max_top_n] float32


def _on_rows(
    scores: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Return scores with `fn` applied to the listed rows only (fn maps [len(rows), vocab] to same)."""
    if len(rows) == scores.shape[0]:
        return fn(scores)
    index = torch.tensor(rows, device=scores.device)  # [len(rows)]
    return scores.index_copy_(0, index, fn(scores.index_select(0, index)))


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device)[:, None]  # [n, 1]


def _repetition_penalty(scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(counts > 0, penalised, scores)


def _top_k(scores: torch.Tensor, k: list[int]) -> torch.Tensor:
    vocab_size = scores.shape[-1]
    k = [min(x, vocab_size) for x in k]
    top = torch.topk(scores, max(k), dim=-1).values  # [n, max_k], descending
    kth = top.gather(1, _column([x - 1 for x in k], scores, torch.int64))  # [n, 1]
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p(scores: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=False)  # [n, vocab] each
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    remove = cumulative <= _column([1.0 - p for p in top_p], scores)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _typical_p(scores: torch.Tensor, mass: list[float]) -> torch.Tensor:
    logprobs = torch.log_softmax(scores, dim=-1)  # [n, vocab]
    entropy = -(logprobs * logprobs.exp()).nansum(-1, keepdim=True)  # [n, 1]
    surprise_gap = (-logprobs - entropy).abs()  # [n, vocab]
    sorted_gap, order = torch.sort(surprise_gap, descending=False)  # [n, vocab] each
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    last = (cumulative < _column(mass, scores)).sum(dim=1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    remove = sorted_gap > sorted_gap.gather(1, last)
    remove[:, 0] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _top_n(logprobs: torch.Tensor, top_n: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab_size = logprobs.shape
    n = [min(x, vocab_size) for x in top_n]
    max_n = max(n, default=0)
    values, ids = torch.topk(logprobs, max_n, dim=-1)  # [batch, max_n] each, descending
    position = torch.arange(max_n, device=logprobs.device)[None, :]  # [1, max_n]
    pad = (position >= _column(n, ids)) | (values == NEG_INF)  # [batch, max_n]
    return ids.masked_fill(pad, PAD_TOKEN_ID), values.masked_fill(pad, NEG_INF)


# (row uses it, warp [n, vocab] scores given those n rows' params); applied in this order (TGI's).
_WARPERS: tuple[tuple[Callable[[SamplingParams], bool], Callable[..., torch.Tensor]], ...] = (
    (lambda p: p.temperature != 1.0, lambda s, ps: s / _column([p.temperature for p in ps], s)),
    (lambda p: p.top_k > 0, lambda s, ps: _top_k(s, [p.top_k for p in ps])),
    (lambda p: p.top_p < 1.0, lambda s, ps: _top_p(s, [p.top_p for p in ps])),
    (lambda p: p.typical_p < 1.0, lambda s, ps: _typical_p(s, [p.typical_p for p in ps])),
)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[n] int64: inverse-CDF draw from each row of probs [n, vocab], given uniforms [n] in [0, 1).

    A token of probability zero is never returned: the rounding case that would land on one (a
    target at the very end of the float32 CDF) falls back to the row's mode.
    """
    cdf = probs.cumsum(dim=-1)  # [n, vocab]
    targets = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # [n, 1]
    chosen = torch.searchsorted(cdf, targets, right=True).clamp_(max=probs.shape[-1] - 1)  # [n, 1]
    impossible = probs.gather(1, chosen) <= 0  # [n, 1]
    return torch.where(impossible, probs.argmax(dim=-1, keepdim=True), chosen).squeeze(1)


class Sampler:
    """Chooses one token per row of a batch of logits, each row with its own params and state.

    One instance serves one worker's successive batches: it keeps the token counts of the last
    batch's penalised rows as one [n, vocab] matrix (each state's counts are row views of it), and
    rebuilds it with one stack only when the penalised sequences or their order change.
    """

    def __init__(self) -> None:
        self._count_matrix: torch.Tensor | None = None  # [num_penalised, vocab] float32
        self._count_states: list[SequenceSamplingState] = []
        self._count_rows: list[torch.Tensor] = []  # the row views bound to _count_states

    def _batch_counts(
        self, states: list[SequenceSamplingState], vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        """[len(states), vocab] counts of these states, each state's counts bound to its row."""
        bound = self._count_rows
        if len(states) == len(bound) and all(s._counts is row for s, row in zip(states, bound, strict=True)):
            assert self._count_matrix is not None
            return self._count_matrix
        matrix = torch.stack([s.counts(vocab_size, device) for s in states])  # [n, vocab]
        staying = {id(s) for s in states}
        for state, row in zip(self._count_states, bound, strict=True):
            if id(state) not in staying and state._counts is row:
                state._counts = row.clone()  # so a departed sequence does not pin the old matrix
        self._count_matrix, self._count_states = matrix, list(states)
        self._count_rows = list(matrix.unbind(0))
        for state, row in zip(states, self._count_rows, strict=True):
            state._counts = row
        return matrix

    def process(
        self, logits: torch.Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
    ) -> torch.Tensor:
        """[batch, vocab] float32: the final processed logits each row's choice is made from.

        Penalties for every row that has one, warpers for sampling rows only. `logits` is not
        modified; it is returned as is when no row needs any processing.
        """
        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        sampled = [i for i, p in enumerate(params) if p.do_sample]
        warps = [(warp, [i for i in sampled if uses(params[i])]) for uses, warp in _WARPERS]
        warps = [(warp, rows) for warp, rows in warps if rows]
        if not penalised and not warps:
            return logits
        scores = logits.clone()  # [batch, vocab]; rows are rewritten in place below
        if penalised:
            counts = self._batch_counts([states[i] for i in penalised], logits.shape[1], logits.device)
            rep = [params[i].repetition_penalty for i in penalised]
            freq = [params[i].frequency_penalty for i in penalised]

            def penalise(rows: torch.Tensor) -> torch.Tensor:
                # Neutral values (1, 0) leave a row bit-identical, so one pass serves both penalties.
                if any(r != 1.0 for r in rep):
                    rows = _repetition_penalty(rows, counts, _column(rep, rows))
                if any(f != 0.0 for f in freq):
                    rows = rows - _column(freq, rows) * counts
                return rows

            scores = _on_rows(scores, penalised, penalise)
        for warp, rows in warps:
            row_params = [params[i] for i in rows]
            scores = _on_rows(scores, rows, lambda s, ps=row_params, w=warp: w(s, ps))
        return scores

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
    ) -> SampleOutput:
        """Choose one token per row and count it in that row's state (callers must not append it).

        logits: [batch, vocab] float32, one row per sequence; params and states: one per row.
        """
        if logits.dim() != 2 or logits.dtype != torch.float32:
            shape = tuple(logits.shape)
            raise ValueError(f"logits must be [batch, vocab] float32, got {shape} {logits.dtype}")
        if not len(params) == len(states) == logits.shape[0]:
            raise ValueError(f"batch {logits.shape[0]} but {len(params)} params and {len(states)} states")
        device = logits.device
        scores = self.process(logits, params, states)  # [batch, vocab]
        logprobs = torch.log_softmax(scores, dim=-1)  # [batch, vocab]
        token_ids = scores.argmax(dim=-1)  # [batch] int64; greedy choice, overwritten for sampled rows
        sampled = [i for i, p in enumerate(params) if p.do_sample]
        if sampled:
            index = torch.tensor(sampled, device=device)  # [num_sampled]
            uniforms = torch.cat(
                [torch.rand(1, generator=states[i].generator, dtype=torch.float64) for i in sampled]
            )
            probs = scores.index_select(0, index).softmax(dim=-1)  # [num_sampled, vocab]
            token_ids.index_copy_(0, index, _draw(probs, uniforms))
        self._count_choices(token_ids, params, states)
        top_token_ids, top_logprobs = _top_n(logprobs, [p.top_n_tokens for p in params])
        return SampleOutput(
            token_ids=token_ids,
            logprobs=logprobs.gather(1, token_ids[:, None]).squeeze(1),
            top_token_ids=top_token_ids,
            top_logprobs=top_logprobs,
        )

    def _count_choices(
        self, token_ids: torch.Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
    ) -> None:
        """Add each chosen token to its sequence's counts: one scatter for the batch count matrix."""
        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        if penalised:
            chosen = token_ids if len(penalised) == len(params) else token_ids[penalised]  # [n]
            ones = torch.ones(len(penalised), 1, device=token_ids.device)  # [n, 1]
            assert self._count_matrix is not None, "process() binds the penalised rows' counts"
            self._count_matrix.scatter_add_(1, chosen[:, None], ones)
        in_matrix = set(penalised)
        for i, state in enumerate(states):
            if state.params.uses_penalties and i not in in_matrix:
                state.append(token_ids[i : i + 1])


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """[num_tokens] float32: log_softmax(logits[i])[next_token_ids[i]] on the raw logits.

    For TGI's `decoder_input_details`: row i is the distribution predicted at prompt position i and
    next_token_ids[i] the token at position i + 1; the caller reports the first prompt token without
    a logprob. Rows are processed `chunk_size` at a time so long prompts never hold a second full
    [num_tokens, vocab] tensor.
    """
    if logits.dim() != 2 or next_token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits [num_tokens, vocab] and next_token_ids [num_tokens], "
            f"got {tuple(logits.shape)} and {tuple(next_token_ids.shape)}"
        )
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # [num_tokens]
    for start in range(0, logits.shape[0], chunk_size):
        block = torch.log_softmax(logits[start : start + chunk_size].float(), dim=-1)  # [chunk, vocab]
        ids = next_token_ids[start : start + chunk_size, None].to(logits.device, torch.int64)  # [chunk, 1]
        out[start : start + chunk_size] = block.gather(1, ids).squeeze(1)
    return out
