"""The adapter benchmark's table (bench_adapters.py): each figure beside its issue-15 target, then how
each part was measured."""

from __future__ import annotations

TARGETS = {  # (what, bound, unit); a bound < 0 means "at least -bound"
    "memory_held": ("memory: pool bytes used / true size", 1.1, "x"),
    "memory_rss": ("memory: resident (PSS) over LoRA off / files", 1.5, "x"),
    "cold_median": ("cold start: TTFT - warm TTFT, median", 0.3, "s"),
    "cold_max": ("cold start: TTFT - warm TTFT, max", 0.3, "s"),
    "stall": ("loads beside others: ITL p50 cold / warm", 1.1, "x"),
    "scale": ("scale: tok/s all zipf / 8 most popular", -0.9, "x"),
    "scale_again": ("scale: the same, second pass over all", -0.9, "x"),
}


def rows(results: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target, met) for every target measured."""
    out = []
    for part in ("memory", "cold", "scale"):
        for key, value in results.get(part, {}).items():
            if key in TARGETS:
                what, bound, unit = TARGETS[key]
                met = None if value is None else (value >= -bound if bound < 0 else value <= bound)
                target = f"{'>=' if bound < 0 else '<='} {_fmt(abs(bound), unit)}"
                out.append((what, _fmt(value, unit), target, met))
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.0f} ms" if unit == "s" else f"{value:.2f}"


def report(results: dict, quick: bool) -> str:
    m = results["machine"]
    lines = [
        f"multilora adapter bench{', QUICK (harness check, not a measurement)' if quick else ''}: {m['cpu']} "
        f"(avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}), {m['logical_cpus']} CPUs, "
        f"{m['torch_threads']} torch threads, load average {m['load_average_1min']:.1f} at the start",
        f"command: {results['command']}",
        "",
        f"{'target':<42} {'measured':>10} {'target':>10}  met",
    ]
    for what, value, target, met in rows(results):
        lines.append(f"{what:<42} {value:>10} {target:>10}  {'-' if met is None else 'yes' if met else 'NO'}")
    lines += ["", *_details(results)]
    return "\n".join(lines)


def _details(results: dict) -> list[str]:
    out, mib = [], 2**20
    if "memory" in results:
        r = results["memory"]
        out += [
            f"memory: {r['adapters']} adapters (ranks 4-64 on q/v, attention, all seven; {r['resident']} "
            f"resident at the end, {r['evictions']} evictions), {r['lora_dtype']} pool of "
            f"ADAPTER_MEMORY={r['adapter_memory'] / mib:.1f} MiB, ADAPTER_HOST_MEMORY=0;",
            f"  pool used {r['pool_bytes_used'] / mib:.2f} MiB of {r['pool_bytes_total'] / mib:.2f} "
            f"(multilora_adapter_bytes_used/total{{tier=device}}); true {r['true_bytes'] / mib:.2f} MiB "
            f"(GET /v1/adapters agrees: {r['true_bytes_match_server']}); "
            f"files {r['file_bytes'] / mib:.1f} MiB",
            f"  PSS {r['rss_lora_off'] / mib:.0f} MiB with LoRA off (MAX_LORA_ADAPTERS=0), "
            f"{r['rss_before'] / mib:.0f} -> {r['rss_after'] / mib:.0f} MiB (peak {r['rss_peak'] / mib:.0f}) "
            f"over the loads: the target's figure is the PSS over LoRA off; the growth over the loads "
            f"alone is {r['memory_rss_growth']:.2f} x the file bytes (the rows and what a load adds)",
        ]
    if "cold" in results:
        r = results["cold"]
        for s in r["starts"]:
            out.append(
                f"cold start {s['adapter']} ({r['file_mb']:.1f} MB): TTFT {_ms(s['cold_ttft_s'])} cold, "
                f"{_ms(s['warm_ttft_s'])} warm; worker load {_num(s['worker_load_ms'])} ms, "
                f"LoadAdapter round trip {_ms(s['rpc_s'])} (from {s.get('tier') or '-'})"
            )
        p50, gaps, plan = r["itl_p50_s"], r["gaps"], results["plan"]
        out += [
            f"loads beside others: {plan['background']} streams (base, a pinned adapter), {plan['rounds']} "
            f"rounds of {plan['burst']} first requests (cold bursts took {r['cold_burst_s']} s)",
            f"  ITL p50 {_ms(p50.get('cold'))} in the cold windows ({gaps.get('cold', 0)} gaps), "
            f"{_ms(p50.get('warm'))} in the warm ones ({gaps.get('warm', 0)}), {_ms(p50.get('quiet'))} quiet "
            f"({gaps.get('quiet', 0)}); failed burst requests {r['burst_failed']}",
        ]
    if "scale" in results:
        r = results["scale"]
        out.append(
            f"scale: {r['adapters']} adapters under a root ({r['own_weights']} named by a request have their "
            f"own weights, the rest hard links), {r['memory_why']}"
        )
        for name, run in r["runs"].items():
            out.append(
                f"  {name:<10} {run['output_tokens_per_s']:7.1f} tok/s, {run['requests']} requests over "
                f"{run['distinct_adapters']} adapters, {run['loads']} loads ({run['hits_host']} requests "
                f"found theirs in the host tier, {run['hits_disk']} on disk), {run['evictions']} evictions, "
                f"TTFT p50 {_ms(run['ttft_p50_s'])}, ITL p50 {_ms(run['itl_p50_s'])}, failed {run['failed']}"
            )
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
