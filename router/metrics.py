"""Prometheus metrics with TGI's names, types and buckets, so TGI dashboards work; served on GET /metrics.

Each app has its own `CollectorRegistry` (no process-global state). The text is rendered the way TGI's
exporter renders it: counters keep their bare name (`tgi_request_count 3`, where prometheus-client would
write `tgi_request_count_total`) and there are no `_created` series.

Request metrics carry an `adapter` label: the adapter id, the base model's id for base-model requests,
and "" for requests that never got an adapter (a body that is not a request, an adapter_id that did not
resolve or load). A request is counted in `tgi_request_count` once it is validated, or when it fails, so
count - success - failure is the number of requests in flight. Ours, next to TGI's: `multilora_*` gauges
of KV blocks and adapter slots in use; `multilora_adapter_slots_active` counts the adapter slots that
queued or running requests refer to, and `multilora_kv_blocks_used` the blocks they hold, so both are 0
whenever no request is in flight; `multilora_queue_size{adapter}` counts the sequences waiting per
adapter, and the counter `multilora_preemptions{adapter}` the running sequences that gave back their KV
blocks when the cache ran out (router/scheduler.py). The adapter registry's metrics are in
router/adapter_metrics.py. Not emitted (no counterpart here): speculative `tgi_request_skipped_tokens`,
and the shard-side `tgi_batch_decode/filter/concat_duration`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from router.errors import ApiError
from router.limits import Limits

if TYPE_CHECKING:
    from router.adapters import AdapterLease
    from router.sequence import GenerationResult
    from router.validation import ValidRequest

# What TGI's exporter sends (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# TGI's buckets: 35 geometric duration buckets from 150 us (x1.5), batch sizes 1..1024.
DURATION_BUCKETS = tuple(1.5e-4 * 1.5**i for i in range(35))
BATCH_SIZE_BUCKETS = tuple(float(i) for i in range(1, 1025))


def _linear(upper: int) -> tuple[float, ...]:
    """TGI's 100 linear buckets up to `upper` (token counts)."""
    return tuple(upper * (i + 1) / 100 for i in range(100))


@dataclass(frozen=True)
class Load:
    """What the scheduler holds at one moment (`Scheduler.load`), which the gauges show."""

    queued: int
    running: int
    reserved_tokens: int  # KV tokens the running sequences hold (their blocks x block size)
    blocks_used: int
    active_slots: int  # distinct adapter slots (not the base model's 0) of the queued and running sequences
    queued_by_adapter: dict[str, int] = field(default_factory=dict)  # waiting sequences per adapter id


class Metrics:
    def __init__(self, limits: Limits, base_model_id: str):
        self.registry = r = CollectorRegistry()
        self.base_model_id = base_model_id
        by_adapter = ("adapter",)

        def duration(name: str, doc: str, labels: tuple[str, ...] = by_adapter) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=DURATION_BUCKETS)

        self.request_count = Counter("tgi_request_count", "Generation requests", by_adapter, registry=r)
        self.request_success = Counter("tgi_request_success", "Successful requests", by_adapter, registry=r)
        self.request_failure = Counter(
            "tgi_request_failure", "Failed requests, by error_type", ("err", "adapter"), registry=r
        )
        self.request_duration = duration("tgi_request_duration", "End-to-end request time (s)")
        self.validation_duration = duration("tgi_request_validation_duration", "Validation time (s)")
        self.queue_duration = duration("tgi_request_queue_duration", "Time waiting in the queue (s)")
        self.inference_duration = duration("tgi_request_inference_duration", "Time from admission (s)")
        self.time_per_token = duration(
            "tgi_request_mean_time_per_token_duration", "Mean inference time per generated token (s)"
        )
        self.input_length = Histogram(
            "tgi_request_input_length",
            "Prompt tokens",
            by_adapter,
            registry=r,
            buckets=_linear(limits.max_input_tokens),
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens",
            by_adapter,
            registry=r,
            buckets=_linear(limits.max_total_tokens),
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "Requested max_new_tokens",
            by_adapter,
            registry=r,
            buckets=_linear(limits.max_total_tokens),
        )

        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Sequences in the running batch", registry=r)
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Tokens reserved by the running batch", registry=r
        )
        Gauge("tgi_batch_max_total_tokens", "max_batch_total_tokens", registry=r).set(
            limits.max_batch_total_tokens
        )
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Sequences per prefill", registry=r, buckets=BATCH_SIZE_BUCKETS
        )
        self.batch_concat = Counter(
            "tgi_batch_concat", "Prefills that joined a running batch", ("reason",), registry=r
        )
        by_method = ("method",)
        self.step_count = Counter("tgi_batch_inference_count", "Worker steps", by_method, registry=r)
        self.step_success = Counter(
            "tgi_batch_inference_success", "Steps that succeeded", by_method, registry=r
        )
        self.step_failure = Counter("tgi_batch_inference_failure", "Steps that failed", by_method, registry=r)
        self.step_duration = duration(
            "tgi_batch_inference_duration", "Step time in the router (s)", by_method
        )
        self.forward_duration = duration("tgi_batch_forward_duration", "Step time in rank 0 (s)", by_method)

        self.slots_active = Gauge(
            "multilora_adapter_slots_active",
            "Adapter slots that queued or running requests refer to",
            registry=r,
        )
        self.blocks_used = Gauge("multilora_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge("multilora_kv_blocks_total", "KV cache blocks of the workers", registry=r)
        self.preemptions = Counter(
            "multilora_preemptions",
            "Running sequences preempted when the KV cache ran out (re-queued, recomputed later)",
            by_adapter,
            registry=r,
        )

    def watch(self, load: Callable[[], Load], num_blocks: int) -> None:
        """Gauges read at scrape time: the scheduler's `load()`, against the workers' `num_blocks`."""
        self.queue_size.set_function(lambda: load().queued)
        self.batch_size.set_function(lambda: load().running)
        self.batch_max_tokens.set_function(lambda: load().reserved_tokens)
        self.slots_active.set_function(lambda: load().active_slots)
        self.blocks_used.set_function(lambda: load().blocks_used)
        self.blocks_total.set(num_blocks)
        self.registry.register(_QueueByAdapter(load))

    # ---- hooks --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self) -> Iterator[RequestRecord]:
        """Record one generation request; an exception leaving the block counts as its failure."""
        record = RequestRecord(self)
        try:
            yield record
        except ApiError as e:
            record.failed(e.error_type)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            record.failed("dropped")  # the client went away
            raise
        except Exception:
            record.failed("internal")
            raise

    def step(self, method: str, seconds: float, forward_ns: int | None) -> None:
        """One Prefill/Decode call; `forward_ns` is None when it failed."""
        method = method.lower()
        self.step_count.labels(method).inc()
        if forward_ns is None:
            self.step_failure.labels(method).inc()
            return
        self.step_success.labels(method).inc()
        self.step_duration.labels(method).observe(seconds)
        self.forward_duration.labels(method).observe(forward_ns / 1e9)

    def preempted(self, adapter: str) -> None:
        """A running sequence of `adapter` (the model id for the base model) gave back its blocks."""
        self.preemptions.labels(adapter).inc()

    def new_batch(self, size: int, *, joining: bool, waited: bool) -> None:
        """A prefill of `size` sequences; `joining` a running batch after `waited` max_waiting_tokens."""
        self.batch_next_size.observe(size)
        if joining:
            self.batch_concat.labels("wait_exceeded" if waited else "backpressure").inc()


class RequestRecord:
    """One request's metrics; the handler reports its milestones, `Metrics.request` its failure."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        self._start = time.monotonic()
        self.validated_at: float | None = None
        self._counted = False
        self._done = False
        self._label = ""
        self.lease: AdapterLease | None = None
        self.tenant: str | None = None  # whose API key the request carried (router/auth.py); None: no keys

    def resolved(self, lease: AdapterLease | None) -> None:
        """The request's adapter is known (None: the base model); it labels the request's metrics. The
        record keeps the request's lease until the request ends (router/lifecycle.py releases it)."""
        self.lease = lease
        self.label(None if lease is None else lease.id)

    def label(self, adapter_id: str | None) -> None:
        """Label the request's metrics with `adapter_id` (None: the base model)."""
        self._label = self._m.base_model_id if adapter_id is None else adapter_id

    def _count(self) -> None:
        if not self._counted:
            self._counted = True
            self._m.request_count.labels(self._label).inc()

    def validated(self, valid: ValidRequest) -> None:
        m, label = self._m, self._label
        self._count()
        self.validated_at = time.monotonic()
        m.validation_duration.labels(label).observe(self.validated_at - self._start)
        m.input_length.labels(label).observe(len(valid.params.input_ids))
        m.max_new_tokens.labels(label).observe(valid.params.max_new_tokens)

    def succeeded(self, result: GenerationResult) -> None:
        if self._done:
            return
        self._done = True
        m, label = self._m, self._label
        self._count()
        m.request_success.labels(label).inc()
        m.request_duration.labels(label).observe(time.monotonic() - self._start)
        m.queue_duration.labels(label).observe(result.queue_s)
        m.inference_duration.labels(label).observe(result.inference_s)
        m.generated_tokens.labels(label).observe(result.generated_tokens)
        if result.generated_tokens:
            m.time_per_token.labels(label).observe(result.inference_s / result.generated_tokens)

    def failed(self, error_type: str) -> None:
        """Count a failure (once per request; later calls are ignored)."""
        if self._done:
            return
        self._done = True
        self._count()
        self._m.request_failure.labels(error_type, self._label).inc()


# ---- exposition ------------------------------------------------------------------------------------


class _QueueByAdapter:
    """`multilora_queue_size{adapter}`, read at scrape time (adapters come and go, so no fixed labels)."""

    def __init__(self, load: Callable[[], Load]):
        self._load = load

    def collect(self):
        family = GaugeMetricFamily("multilora_queue_size", "Sequences waiting by adapter", labels=["adapter"])
        for adapter, count in sorted(self._load().queued_by_adapter.items()):
            family.add_metric([adapter], float(count))
        yield family


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text format as TGI writes it: bare counter names, no `_created` series."""
    lines = []
    for family in registry.collect():
        kind = "untyped" if family.type == "unknown" else family.type
        lines.append(f"# HELP {family.name} {family.documentation}")
        lines.append(f"# TYPE {family.name} {kind}")
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            name = family.name if family.type == "counter" else s.name
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels.items())
            lines.append(f"{name}{{{labels}}} {_number(s.value)}" if labels else f"{name} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if x.is_integer() else repr(x)
