"""How long one step RPC may take before its ranks are taken as hung: what it computes times a measured
per-token bound, never less than a floor.

A rank that hangs (stopped, deadlocked in a collective, a wedged driver) answers nothing, and without a
deadline every request of its batch would wait forever. A step computing `num_tokens` tokens (prompt
tokens of new sequences plus one per decoding sequence) gets

    max(floor_s, factor * num_tokens * per_token_s)

where `per_token_s` is the slowest forward time per token (StepResponse.forward_ns / tokens) among the
last `window` steps. The slowest, not a mean: a deadline that fires on a healthy but slow step takes the
whole server down, so it errs long, and the window lets one freak step be forgotten.

The floor covers what forward_ns does not measure (the RPC, a step queued on the rank behind an adapter
copy) and the first steps, before anything is measured, when the deadline is the floor alone: a first
forward that compiles or warms up kernels (CuPy's LoRA kernels on CUDA) must fit in it.
"""

from __future__ import annotations

from collections import deque

_NS_PER_S = 1e9


class StepDeadline:
    def __init__(self, floor_s: float, factor: float, window: int = 64):
        if floor_s <= 0:
            raise ValueError(f"the step deadline floor must be positive, got {floor_s}")
        if factor < 1:
            raise ValueError(f"the step deadline factor must be at least 1, got {factor}")
        if window < 1:
            raise ValueError(f"the measurement window must hold at least one step, got {window}")
        self.floor_s = floor_s
        self.factor = factor
        self._recent_ns_per_token: deque[float] = deque(maxlen=window)

    @property
    def per_token_s(self) -> float | None:
        """The slowest measured forward time per token among the recent steps; None before any."""
        if not self._recent_ns_per_token:
            return None
        return max(self._recent_ns_per_token) / _NS_PER_S

    def timeout_s(self, num_tokens: int) -> float:
        """The deadline, in seconds from its start, of a step that computes `num_tokens` tokens."""
        per_token_s = self.per_token_s
        if per_token_s is None:
            return self.floor_s
        return max(self.floor_s, self.factor * num_tokens * per_token_s)

    def observe(self, num_tokens: int, forward_ns: int) -> None:
        """Record a step that computed `num_tokens` tokens in `forward_ns` (a worker that reports no
        forward time, or an empty step, teaches nothing)."""
        if num_tokens > 0 and forward_ns > 0:
            self._recent_ns_per_token.append(forward_ns / num_tokens)
