"""GET /metrics: TGI's names and types in Prometheus text, counters that move, the adapter label, gauges."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from router.config import RouterConfig
from router.limits import Limits
from router.metrics import Metrics
from tests.router.conftest import BASE_MODEL_ID

TGI_TYPES = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_max_total_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_concat": "counter",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_failure": "counter",
    "tgi_batch_inference_duration": "histogram",
    "tgi_batch_forward_duration": "histogram",
    "multilora_adapters_loaded": "gauge",
    "multilora_adapter_slots_used": "gauge",
    "multilora_adapter_slots_active": "gauge",
    "multilora_adapter_slots_total": "gauge",
    "multilora_kv_blocks_used": "gauge",
    "multilora_kv_blocks_total": "gauge",
}


async def scrape(h) -> tuple[str, dict]:
    """The raw text and {family name: {(sample name, sorted labels): value}}."""
    resp = await h.http.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    families = {}
    for f in text_string_to_metric_families(text):
        families[f.name] = (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
    return text, families


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    """One sample's value (0 if absent); counters are read as `<name>_total` by the parser."""
    kind, samples = families[name]
    sample = sample or (name + "_total" if kind == "counter" else name)
    return samples.get((sample, tuple(sorted(labels.items()))), 0.0)


async def test_names_types_and_tgi_text_format(start_router):
    h = await start_router()
    assert (await h.generate("Hi", max_new_tokens=2)).status == 200
    text, families = await scrape(h)
    assert {name: families[name][0] for name in TGI_TYPES} == TGI_TYPES
    # TGI's exporter writes counters under their bare names; dashboards query `tgi_request_count`.
    assert f'\ntgi_request_count{{adapter="{BASE_MODEL_ID}"}} 1\n' in text
    assert "_created" not in text
    assert not [n for n, kind in TGI_TYPES.items() if kind == "counter" and f"{n}_total" in text]
    # TGI's buckets: 35 geometric duration buckets from 150 us, 100 linear token buckets, batch 1..1024.
    bucket_lines = [line for line in text.splitlines() if line.startswith("tgi_request_duration_bucket")]
    assert len(bucket_lines) == 36  # + Inf
    assert 'le="0.00015"' in bucket_lines[0]
    input_buckets = [line for line in text.splitlines() if line.startswith("tgi_request_input_length_bucket")]
    assert len(input_buckets) == 101 and 'le="255.0"' in input_buckets[-2]
    assert text.count("tgi_batch_next_size_bucket") == 1025


async def test_request_counters_move_with_adapter_label(start_router):
    h = await start_router()
    _, before = await scrape(h)
    assert value(before, "tgi_request_count", adapter="org/adapter-one") == 0
    assert (await h.generate("Hello", max_new_tokens=4, adapter_id="org/adapter-one")).status == 200
    assert (await h.generate("Hello", max_new_tokens=3)).status == 200
    assert (await h.generate("Hello", max_new_tokens=0, adapter_id="adapter-two")).status == 422
    assert (await h.generate("Hello", adapter_id="nope")).status == 422
    assert (
        await h.http.post("/generate", data=b"{", headers={"Content-Type": "application/json"})
    ).status == 400
    _, m = await scrape(h)

    one, two, base = "org/adapter-one", "adapter-two", BASE_MODEL_ID
    assert value(m, "tgi_request_count", adapter=one) == 1
    assert value(m, "tgi_request_success", adapter=one) == 1
    assert value(m, "tgi_request_count", adapter=base) == 1
    assert value(m, "tgi_request_success", adapter=base) == 1
    assert value(m, "tgi_request_failure", err="validation", adapter=two) == 1
    # An unknown adapter_id and a body that is not JSON cannot label by adapter (unbounded values).
    assert value(m, "tgi_request_failure", err="validation", adapter="") == 2
    assert value(m, "tgi_request_count", adapter="") == 2
    assert value(m, "tgi_request_count", adapter="nope") == 0

    gen = "tgi_request_generated_tokens"
    assert value(m, gen, gen + "_count", adapter=one) == 1
    assert value(m, gen, gen + "_sum", adapter=one) == 4
    assert value(m, "tgi_request_input_length", "tgi_request_input_length_sum", adapter=one) == 6
    assert value(m, "tgi_request_max_new_tokens", "tgi_request_max_new_tokens_sum", adapter=base) == 3
    for name in (
        "tgi_request_duration",
        "tgi_request_validation_duration",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
    ):
        assert value(m, name, name + "_count", adapter=one) == 1, name

    # Two prefills (one per request) and 3 + 2 decode steps.
    assert value(m, "tgi_batch_inference_count", method="prefill") == 2
    assert value(m, "tgi_batch_inference_success", method="prefill") == 2
    assert value(m, "tgi_batch_inference_count", method="decode") == 5
    assert value(m, "tgi_batch_next_size", "tgi_batch_next_size_count") == 2
    dur = "tgi_batch_forward_duration"
    assert value(m, dur, dur + "_count", method="decode") == 5


async def test_failures_by_error_type(start_router):
    h = await start_router(world_size=1, max_concurrent_requests=1)
    h.fakes[0].fail_next["Decode"] = "boom"
    assert (await h.generate("Hi", max_new_tokens=5)).status == 424
    h.fakes[0].step_delay = 0.05
    slow = asyncio.create_task(h.generate("Hi", max_new_tokens=3))
    await asyncio.sleep(0.02)
    assert (await h.generate("Hi", max_new_tokens=1, adapter_id="adapter-two")).status == 429
    assert (await slow).status == 200
    _, m = await scrape(h)
    assert value(m, "tgi_request_failure", err="generation", adapter=BASE_MODEL_ID) == 1
    # Refused before its body was read: no adapter known yet.
    assert value(m, "tgi_request_failure", err="overloaded", adapter="") == 1
    assert value(m, "tgi_batch_inference_failure", method="decode") == 1


async def test_gauges_follow_the_batch(start_router):
    h = await start_router(world_size=1)
    _, m = await scrape(h)
    assert value(m, "multilora_kv_blocks_total") == 64
    assert value(m, "multilora_kv_blocks_used") == 0
    assert value(m, "multilora_adapters_loaded") == 2
    assert value(m, "multilora_adapter_slots_used") == 2
    assert value(m, "multilora_adapter_slots_total") == 4
    assert value(m, "multilora_adapter_slots_active") == 0
    assert value(m, "tgi_batch_max_total_tokens") == 256

    h.fakes[0].step_delay = 0.02
    running = [
        asyncio.create_task(h.generate("Hi", max_new_tokens=20)),  # at most 3 + 20 tokens = 6 blocks
        asyncio.create_task(h.generate("Hi", max_new_tokens=20, adapter_id="adapter-two")),
        asyncio.create_task(h.generate("Hi", max_new_tokens=20, adapter_id="adapter-two")),
    ]
    async with asyncio.timeout(5):
        while len(h.state.scheduler.running) < 3:
            await asyncio.sleep(0.005)
    _, m = await scrape(h)
    assert value(m, "tgi_batch_current_size") == 3
    # Blocks on demand: each holds what it has computed so far (at least one block), not 6 blocks.
    used = value(m, "multilora_kv_blocks_used")
    assert 3 <= used < 3 * 6
    assert value(m, "tgi_batch_current_max_tokens") == used * 4
    assert value(m, "multilora_adapter_slots_active") == 1  # the base model takes no slot
    assert [r.status for r in await asyncio.gather(*running)] == [200] * 3
    await h.settle()
    _, m = await scrape(h)
    assert value(m, "tgi_batch_current_size") == 0
    assert value(m, "multilora_kv_blocks_used") == 0
    assert value(m, "multilora_adapter_slots_active") == 0
    assert value(m, "tgi_queue_size") == 0


def test_registries_are_per_app(tiny_tokenizer_dir):
    """Two apps in one process (tests, or two routers) must not share or collide on a global registry."""
    config = RouterConfig(model_id="m", model_dir=str(tiny_tokenizer_dir), worker_uds=["/x"])
    limits = Limits.resolve(config, num_blocks=16, block_size=4, max_position=64)
    a, b = Metrics(limits, "m"), Metrics(limits, "m")
    a.request_count.labels("m").inc()
    assert a.registry is not b.registry
    assert a.registry.get_sample_value("tgi_request_count_total", {"adapter": "m"}) == 1
    assert b.registry.get_sample_value("tgi_request_count_total", {"adapter": "m"}) is None
