"""Request and batch limits: the config's values, with the unset ones derived from the workers' Info, and
the fairness policy's settings (router/fairness.py) with the queue cap derived from them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from router.config import RouterConfig
from router.fairness import FairnessConfig

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Limits that cannot work together, or that the workers cannot hold."""


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None
    max_concurrent_requests: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_best_of: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    max_queued_per_adapter: int | None = None
    """ADAPTER_QUEUE_SHARE of max_concurrent_requests, in sequences (None: no cap of its own)."""
    fairness: FairnessConfig = field(default_factory=FairnessConfig)

    @classmethod
    def resolve(cls, config: RouterConfig, *, num_blocks: int, block_size: int, max_position: int) -> Limits:
        """TGI's derivation: total = min(KV capacity, max_position_embeddings), input = total - 1.

        A prompt longer than max_batch_prefill_tokens is prefilled in chunks (router/scheduler.py), so
        the input limit is bounded by the model and the KV cache only. Explicit values that contradict
        each other or the workers raise ConfigError.
        """
        capacity = num_blocks * block_size
        batch_total = config.max_batch_total_tokens or capacity
        if batch_total > capacity:
            raise ConfigError(
                f"max_batch_total_tokens ({batch_total}) exceeds what the workers' KV cache holds "
                f"({num_blocks} blocks x {block_size} tokens = {capacity})"
            )
        total = config.max_total_tokens or min(batch_total, max_position)
        prefill = config.max_batch_prefill_tokens
        if prefill > batch_total:
            log.warning(
                "max_batch_prefill_tokens %d lowered to max_batch_total_tokens %d", prefill, batch_total
            )
            prefill = batch_total
        max_input = config.max_input_tokens or total - 1
        checks = [
            (max_input >= 1, f"max_input_tokens ({max_input}) must be >= 1"),
            (max_input < total, f"max_input_tokens ({max_input}) must be < max_total_tokens ({total})"),
            (
                total <= max_position,
                f"max_total_tokens ({total}) exceeds the model's max_position_embeddings ({max_position})",
            ),
            (
                total <= batch_total,
                f"max_total_tokens ({total}) exceeds max_batch_total_tokens ({batch_total}): "
                "a request that long could never be scheduled",
            ),
            (prefill >= 1, f"max_batch_prefill_tokens ({prefill}) must be >= 1"),
            (config.max_batch_size is None or config.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (config.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1"),
            (config.max_best_of >= 1, "max_best_of must be >= 1"),
            (0 < config.adapter_queue_share <= 1, "adapter_queue_share must be in (0, 1]"),
            *(
                (weight > 0, f"the weight of {name!r} must be > 0, got {weight}")
                for name, weight in (*config.tenant_weights.items(), *config.adapter_weights.items())
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return cls(
            max_input_tokens=max_input,
            max_total_tokens=total,
            max_batch_prefill_tokens=prefill,
            max_batch_total_tokens=batch_total,
            max_batch_size=config.max_batch_size,
            max_concurrent_requests=config.max_concurrent_requests,
            max_stop_sequences=config.max_stop_sequences,
            max_top_n_tokens=config.max_top_n_tokens,
            max_best_of=config.max_best_of,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_tokens=config.max_waiting_tokens,
            max_queued_per_adapter=_queue_cap(config),
            fairness=FairnessConfig(
                adapter_weights=config.adapter_weights,
                tenant_weights=config.tenant_weights,
                by_tenant=len(config.tenant_keys()) >= 2,
                base_adapter=config.model_id,
            ),
        )


def _queue_cap(config: RouterConfig) -> int | None:
    """At least one sequence per adapter; none at a share of 1 (MAX_CONCURRENT_REQUESTS bounds it)."""
    if config.adapter_queue_share >= 1:
        return None
    return max(1, math.floor(config.adapter_queue_share * config.max_concurrent_requests))
