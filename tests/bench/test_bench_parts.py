"""The benchmark's pure parts: seeded workload, percentiles, run figures and the P1-P6 arithmetic."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.bench import adapter_set, hf_baseline, machine, ratios
from tests.bench.figures import percentile, summarize
from tests.bench.loadgen import Record, Run
from tests.bench.workload import (
    Request,
    build_requests,
    load_prompts,
    poisson_offsets,
    popularity_weights,
    with_adapters,
)


def test_prompts_are_varied_and_unique():
    prompts = load_prompts()
    assert len(prompts) >= 16
    assert len(set(prompts)) == len(prompts)


def test_workload_is_reproducible_and_within_bounds():
    texts = [f"t{i}" for i in range(5)]
    a = build_requests(texts, 40, (4, 9), seed=3)
    assert a == build_requests(texts, 40, (4, 9), seed=3)
    assert a != build_requests(texts, 40, (4, 9), seed=4)
    assert all(4 <= r.max_new_tokens <= 9 for r in a)
    assert {r.text for r in a} == set(texts)
    names = ["x", "y", "z"]
    mixed = with_adapters(a, names, "uniform", seed=1)
    assert [r.max_new_tokens for r in mixed] == [r.max_new_tokens for r in a]
    assert {r.adapter for r in mixed} == set(names)
    assert with_adapters(a, [], "uniform", seed=1) == a


def test_zipf_prefers_the_first_adapters():
    w = popularity_weights(4, "zipf")
    assert w == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    reqs = [Request(i, "p", 1) for i in range(4000)]
    picks = [r.adapter for r in with_adapters(reqs, ["a", "b", "c", "d"], "zipf", seed=0)]
    assert picks.count("a") > 1.7 * picks.count("b") > 2.5 * picks.count("d")
    with pytest.raises(ValueError):
        popularity_weights(3, "pareto")


def test_poisson_offsets_have_the_rate():
    offsets = poisson_offsets(4000, rate=5.0, seed=0)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summarize_counts_tokens_gaps_and_early_stops():
    ok = Record(Request(0, "p", 3), sent=10.0, token_times=[10.5, 10.6, 10.8], finish_reason="length")
    early = Record(Request(1, "p", 5), sent=10.0, token_times=[11.0], finish_reason="eos_token")
    failed = Record(Request(2, "p", 5), sent=10.0, error="HTTP 500")
    s = summarize(Run([ok, early, failed], wall_s=2.0))
    assert s["output_tokens"] == 4 and s["failed"] == 1 and s["early_stops"] == 1
    assert s["output_tokens_per_s"] == 2.0 and s["requests_per_s"] == 1.0
    assert s["ttft_p50_s"] == pytest.approx(0.5) and s["ttft_p99_s"] == pytest.approx(1.0)
    assert s["itl_p50_s"] == pytest.approx(0.1) and s["itl_p99_s"] == pytest.approx(0.2)
    assert s["first_error"] == "HTTP 500"


def _figures(**over):
    run = {"output_tokens_per_s": 100.0, "ttft_p50_s": 0.1, "itl_p50_s": 0.01}
    f = {
        "base_saturated": run,
        "mixed8_saturated": {**run, "output_tokens_per_s": 96.0},
        "hf_peft": {"output_tokens_per_s": 20.0, "batch_size": 32},
        "small8_zipf": {"output_tokens_per_s": 90.0},
        "many_registered": {"output_tokens_per_s": 72.0, "registered": 1000, "why": "fits"},
        "base_lone": {"itl_p50_s": 0.005},
        "mixed8_lone": {"ttft_p50_s": 0.05},
        "mixed8_half_load": {"ttft_p50_s": 0.15, "rate": 2.0},
        "machine": {"copy_bytes_per_s": 50e9, "gemm_flops_per_s": 1e12},
        "model": {"weight_bytes": 200_000_000, "parameters": 100_000_000},
    }
    f.update(over)
    return f


def test_ratios_arithmetic_and_targets():
    r = ratios.compute(_figures())
    assert r["P1"].value == pytest.approx(0.96) and r["P1"].met
    assert r["P2"].value == pytest.approx(4.8) and r["P2"].met is False
    assert r["P3"].value == pytest.approx(0.8) and r["P3"].met is False
    assert r["P4"].value == pytest.approx(1.25) and r["P4"].met  # 5 ms / (200 MB / 50 GB/s)
    assert r["P5"].value == pytest.approx(3.0) and r["P5"].met is False
    assert r["P6"].value == pytest.approx(96 / 5000) and r["P6"].met is False
    assert "P1" in ratios.table({k: v.as_dict() for k, v in r.items()})


def test_references_run_twice_are_averaged():
    after = {"output_tokens_per_s": 140.0}
    r = ratios.compute(_figures(base_saturated_after=after, small8_zipf_after={"output_tokens_per_s": 54.0}))
    assert r["P1"].value == pytest.approx(96 / 120)  # mean of 100 before and 140 after
    assert r["P3"].value == pytest.approx(72 / 72)  # mean of 90 and 54
    assert "before" in r["P1"].detail and "140.0 after" in r["P1"].detail


def test_machine_bounds_from_the_linear_passes():
    sat = {"output_tokens_per_s": 96.0, "concurrency": 64, "output_tokens": 3000, "prompt_tokens": 1000}
    passes = {"1": 0.002, "64": 0.1, str(ratios.PROMPT_ROWS): ratios.PROMPT_ROWS / 2000}
    machine = {"copy_bytes_per_s": 50e9, "gemm_flops_per_s": 1e12, "linear_pass_s": passes}
    r = ratios.compute(_figures(mixed8_saturated=sat, machine=machine))
    assert r["P4"].bound == pytest.approx(0.5)  # 2 ms of linears / (200 MB / 50 GB/s)
    best = 3000 / (3000 / 640 + 1000 / 2000)  # output at 640 tok/s (64 rows in 0.1 s), prompts at 2000
    assert r["P6"].bound == pytest.approx(best / 5000) and r["P2"].bound == pytest.approx(best / 20)
    printed = ratios.table({k: v.as_dict() for k, v in r.items()})
    assert f"{best:.0f} output tok/s" in r["P6"].bound_detail and "machine bound" in printed
    assert r["P1"].bound is None and r["P1"].as_dict()["machine_bound"] is None


def test_no_bounds_without_the_linear_passes():
    r = ratios.compute(_figures())
    assert r["P2"].bound is r["P4"].bound is r["P6"].bound is None


def test_linear_shapes_cover_the_checkpoint(tiny_model_dir):
    """Every weight of the checkpoint but the embedding (unless tied: then it is the LM head) and the
    norms is in a linear layer."""
    shapes = machine.linear_shapes(tiny_model_dir)
    size = machine.model_size(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    norms = (2 * config["num_hidden_layers"] + 1) * config["hidden_size"]
    embedding = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"]
    assert sum(o * i for o, i in shapes) == size["parameters"] - norms - embedding
    assert len(shapes) == 4 * config["num_hidden_layers"] + 1
    assert machine.linear_pass_s(tiny_model_dir, 2, repeats=1) > 0


def test_ratio_without_a_figure_is_none_not_a_crash():
    r = ratios.compute(_figures(mixed8_lone={"ttft_p50_s": None}))
    assert r["P5"].value is None and r["P5"].met is None
    assert r["P5"].as_dict()["target"] == "<= 2"


def test_baseline_takes_only_a_concrete_dtype(tmp_path):
    """The baseline runs in the dtype the server reports; `auto` there would be a resolution missed."""
    with pytest.raises(ValueError, match="'auto' is not one of float32, bfloat16, float16"):
        hf_baseline.run_baseline(tmp_path, {}, [], 1, tmp_path, "auto")


def test_adapter_cache_is_per_model_shape(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, hidden in ((a, 64), (b, 576)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    assert adapter_set.model_key(a) != adapter_set.model_key(b)
    assert adapter_set.model_key(a) == adapter_set.model_key(a)


def test_adapter_bench_splits_gaps_by_window():
    from tests.bench.bench_adapters import split_gaps

    rec = Record(
        Request(0, "p", 9), sent=0.0, token_times=[0.0, 1.0, 1.5, 3.0, 3.2, 6.0], finish_reason="length"
    )
    gaps = split_gaps([rec], [("cold", 1.2, 1.6), ("warm", 2.9, 3.5)], quiet=(0.5, 5.0))
    assert gaps == {"quiet": [1.0], "cold": [0.5], "warm": [1.5, pytest.approx(0.2)]}  # 6.0: past quiet


def test_adapter_true_bytes_count_only_lora_elements(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(4, 64),
            "other": torch.zeros(1000),
        },
        tmp_path / adapter_set.WEIGHTS,
    )
    assert machine.lora_rows(tmp_path) == {64: 8, 32: 4}  # A: r rows of h_in; B: r rows of h_out
    assert machine.true_lora_bytes(tmp_path, 2) == 2 * (2 * 4 * 64 + 32 * 4)


def test_adapter_memory_holds_adapters_in_the_pools_pages(tiny_model_dir, tiny_adapters):
    """A worker whose ADAPTER_MEMORY is adapter_memory_for its adapters holds them all, and the pool
    bytes they use are their true size up to a page per width class."""
    from collections import Counter

    import torch

    from worker.config import WorkerConfig
    from worker.lora.adapter import load_peft_adapter
    from worker.lora.pages import page_elems_for
    from worker.lora.slots import AdapterMemoryError
    from worker.parallel import ParallelContext
    from worker.runner import ModelRunner

    names = ["r4_qv", "r8_all"]
    widths = machine.lora_widths(tiny_model_dir)
    from worker.kernels import select_lora_ops

    assert machine.pool_dtype("cpu", torch.bfloat16) == select_lora_ops(torch.device("cpu")).pool_dtype(
        torch.bfloat16
    )
    rows = sum((machine.lora_rows(tiny_adapters[n]) for n in names), Counter())
    assert set(rows) <= set(widths)
    size = machine.adapter_memory_for(tiny_model_dir, rows, torch.float32)
    config = WorkerConfig(
        model_dir=tiny_model_dir, dtype="float32", num_blocks=8, max_adapters=3, adapter_memory_bytes=size
    )
    runner = ModelRunner(config, ParallelContext())
    assert runner.slots.pool.bytes_total == size
    true = 0
    for slot, name in enumerate(names, start=1):
        adapter = load_peft_adapter(name, tiny_adapters[name], 3, runner.module_shapes())
        held = runner.load_adapter(slot, adapter, generation=slot)
        assert held.weight_bytes == machine.true_lora_bytes(tiny_adapters[name], 4)
        true += held.weight_bytes
    page_bytes = page_elems_for(widths) * 4
    assert true <= runner.slots.pool.bytes_used <= true + len(widths) * page_bytes
    adapter = load_peft_adapter("r8_all", tiny_adapters["r8_all"], 3, runner.module_shapes())
    with pytest.raises(AdapterMemoryError):  # sized for these two: a third does not fit
        runner.load_adapter(3, adapter, generation=3)


def test_adapter_bench_rows_compare_with_the_targets():
    from tests.bench.adapter_report import rows

    results = {
        "memory": {"memory_held": 7.0, "memory_rss": 1.2, "memory_rss_growth": 0.1},
        "scale": {"scale": 0.95},
        "cold": {},
    }
    assert rows(results) == [  # the growth over the loads alone is printed, not a target
        ("memory: pool bytes used / true size", "7.00", "<= 1.10", False),
        ("memory: resident (PSS) over LoRA off / files", "1.20", "<= 1.50", True),
        ("scale: tok/s all zipf / 8 most popular", "0.95", ">= 0.90", True),
    ]
    assert rows({"cold": {"cold_median": 0.25, "cold_max": None}}) == [
        ("cold start: TTFT - warm TTFT, median", "250 ms", "<= 300 ms", True),
        ("cold start: TTFT - warm TTFT, max", "-", "<= 300 ms", None),
    ]


def test_link_root_hard_links_the_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("adapter_config.json", adapter_set.WEIGHTS):
        (src / name).write_text(name)
    root = adapter_set.link_root(tmp_path / "root", {"a": src, "b": src})
    assert (root / "b" / adapter_set.WEIGHTS).read_text() == adapter_set.WEIGHTS
    assert (root / "a" / adapter_set.WEIGHTS).stat().st_ino == (src / adapter_set.WEIGHTS).stat().st_ino


def test_adapter_bench_reads_load_times_from_the_log():
    """The worker's and the router's load lines (worker/server.py, router/adapter_registry.py); the first
    load of each adapter counts."""
    from tests.bench.bench_adapters import _load_times

    log = (
        "INFO adapter 'bench/cold-000' in slot 2 as generation 3 (r=8, 9.8 MB, from disk, 41.5 ms)\n"
        "INFO Loaded adapter bench/cold-000 (hf-cache) into slot 2 as generation 3 from disk in 0.052 s\n"
        "INFO adapter 'bench/cold-000' in slot 4 as generation 9 (r=8, 9.8 MB, from host, 2.0 ms)\n"
        "INFO Loaded adapter bench/cold-000 (hf-cache) into slot 4 as generation 9 from host in 0.004 s\n"
    )
    assert _load_times(log) == ({"bench/cold-000": ("disk", 41.5)}, {"bench/cold-000": 0.052})
