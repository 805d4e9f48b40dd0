"""The adapter registry's Prometheus metrics (router/adapter_registry.py), in the app's metrics registry
(router/metrics.py renders them):

- `multilora_adapter_loads{source,result}`: loads by source (startup, route, root, hf-cache, hub-download)
  and result (ok, failed); a failed Hub download counts as a failed hub-download load;
- `multilora_adapter_load_duration`: LoadAdapter on every rank (s);
- `multilora_adapter_evictions`: adapters evicted from a slot for another;
- `multilora_adapter_hits{tier}`: requests by where their adapter was: device (resident), host (out of
  the pool, its weights kept in the ranks' host tier: the request waited for a copy) or disk (it waited
  for a load from the files);
- `multilora_adapter_load_waiting`: requests waiting on a load now;
- `multilora_adapters_loaded`: adapters resident in a slot; `multilora_adapter_slots_used`/`_total`: slots
  taken (holding an adapter, being loaded or emptied, or kept out after a failed unload) and all slots;
- `multilora_adapter_bytes_used{tier}` and `multilora_adapter_bytes_total{tier}`: device (the adapter
  pools the LoRA ops read, ADAPTER_MEMORY per rank) and host (the host tiers, ADAPTER_HOST_MEMORY per
  rank), summed over the ranks as the last load or unload reported them; used for disk is the
  registered adapters' files (disk has no budget).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.adapters import SourceKind
from router.metrics import DURATION_BUCKETS

if TYPE_CHECKING:
    from router.adapter_registry import AdapterRegistry


class AdapterMetrics:
    def __init__(self, r: CollectorRegistry):
        self.loads = Counter(
            "multilora_adapter_loads", "Adapter loads, by source and result", ("source", "result"), registry=r
        )
        for source in get_args(SourceKind):
            for result in ("ok", "failed"):
                self.loads.labels(source, result)
        self.load_duration = Histogram(
            "multilora_adapter_load_duration",
            "LoadAdapter on every rank (s)",
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.evictions = Counter(
            "multilora_adapter_evictions", "Adapters evicted from a slot for another", registry=r
        )
        self.hits = Counter(
            "multilora_adapter_hits", "Adapter requests by where the adapter was found", ("tier",), registry=r
        )
        for tier in ("device", "host", "disk"):
            self.hits.labels(tier)
        self.load_waiting = Gauge(
            "multilora_adapter_load_waiting", "Requests waiting on an adapter load", registry=r
        )
        self.loaded = Gauge("multilora_adapters_loaded", "Adapters resident in a slot", registry=r)
        self.slots_used = Gauge(
            "multilora_adapter_slots_used", "Adapter slots holding, loading or emptying one", registry=r
        )
        self.slots_total = Gauge("multilora_adapter_slots_total", "Adapter slots of the workers", registry=r)
        by_tier = ("tier",)
        self.bytes_used = Gauge("multilora_adapter_bytes_used", "Adapter bytes per tier", by_tier, registry=r)
        self.bytes_total = Gauge(
            "multilora_adapter_bytes_total", "Adapter byte budget per tier", by_tier, registry=r
        )

    def watch(self, adapters: AdapterRegistry) -> None:
        """Gauges read from the registry at scrape time."""

        def resident():
            return [e for e in adapters.entries() if e.residency is not None]

        self.loaded.set_function(lambda: len(resident()))
        self.slots_used.set_function(lambda: adapters.slots.used)
        self.slots_total.set(adapters.slots.total)
        self.load_waiting.set_function(lambda: adapters.waiting)
        self.bytes_used.labels("device").set_function(lambda: adapters.memory.pool_used)
        self.bytes_total.labels("device").set_function(lambda: adapters.memory.pool_total)
        self.bytes_used.labels("host").set_function(lambda: adapters.memory.host_used)
        self.bytes_total.labels("host").set_function(lambda: adapters.memory.host_total)
        self.bytes_used.labels("disk").set_function(lambda: sum(e.disk_bytes for e in adapters.entries()))

    def load(self, source: SourceKind, *, ok: bool, seconds: float | None = None) -> None:
        self.loads.labels(source, "ok" if ok else "failed").inc()
        if seconds is not None:
            self.load_duration.observe(seconds)

    def evicted(self) -> None:
        self.evictions.inc()

    def hit(self, tier: str) -> None:
        self.hits.labels(tier).inc()
