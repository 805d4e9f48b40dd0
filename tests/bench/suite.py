"""Issue 6's benchmark suite: our server (base-only, 8 adapters, up to 1000) against transformers+peft.

    .venv/bin/python -m tests.bench.suite [--quick] [--out bench-results]     # make bench / bench-quick

One run measures, on this machine and the same seeded requests:
1. our server base-only: a lone request at a time, then saturated (the largest concurrency), and saturated
   once more after step 3, so that P1's reference brackets the adapter runs;
2. the machine, with no server running: memory copy bandwidth, GEMM FLOP/s in the dtype the server chose
   (its /info `model_dtype`), and one pass of the model's own linear layers at 1 row, at the saturated
   batch and at a prefill's rows (machine.py): the floor under any step;
3. our server with 8 `mixed` adapters (r 8/16/32, all projections), uniform popularity: a concurrency
   sweep (a lone request first, the saturated run last), then Poisson arrivals at half the saturating
   request rate (the most requests/s any concurrency of the sweep sustained);
4. our server with `small` adapters (r8 on q, v) registered in growing numbers up to 1000 (or what fits
   in memory), zipf popularity, saturated, then 8 registered once more (P3's reference brackets them);
   each of these servers gets an ADAPTER_MEMORY that holds its adapters at their true size (all pinned;
   the pool is allocated whole at startup), MAX_LORA_ADAPTERS staying a count (auto);
5. transformers+peft with the same 8 adapters on the saturated run's requests, in the server's dtype
   (hf_baseline.py).
Then it prints every run side by side and the ratios P1-P6 against their targets (ratios.py), and
writes bench.json and bench.png to the output dir. Each server is a fresh `launcher.py` (harness.Server);
peak RSS is its whole process tree's, startup included.

--quick checks the harness: every stage above runs and the JSON, PNG and ratios come out, on a tiny
random-weight Llama with SmolLM2's tokenizer (tiny_chat_model) unless --model-dir names another, with a
few short requests and small machine probes. Its work is then the harness's own (server startups,
requests, the files), whatever this CPU's speed at the real model's dtype; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tests.adapter_factory import tiny_chat_model
from tests.bench import adapter_set, hf_baseline, loadgen, machine, plot, ratios
from tests.bench.figures import summarize
from tests.bench.rss_monitor import RssMonitor
from tests.bench.workload import Request, build_requests, poisson_offsets, render_chat, with_adapters
from tests.e2e.harness import ROOT, Server, get

P3_TARGET = 1000
MEMORY_RESERVE = 4 * 2**30  # of MemAvailable, left for the model, KV cache, router, clients and slack


@dataclass(frozen=True)
class Plan:
    requests: int  # per saturated run
    lengths: tuple[int, int]  # max_new_tokens drawn uniformly from this range
    concurrencies: tuple[int, ...]  # the 8-adapter sweep: first 1 (lone), last the saturating one
    lone_requests: int
    poisson_requests: int
    scaling: tuple[int, ...]  # registered small adapters; starts at 8, ends at P3's count
    hf_batch_size: int
    hf_requests: int | None = None  # the first this many of the saturated run's requests; None: all
    seed: int = 0
    # The machine probes: MiB copied (full: far past the caches), the GEMM's n, best of how many runs.
    copy_mib: int = 512
    gemm_n: int = 2048
    probe_repeats: int = 5


FULL = Plan(
    requests=128,
    lengths=(32, 160),
    concurrencies=(1, 4, 16, 32, 64),
    lone_requests=8,
    poisson_requests=64,
    scaling=(8, 64, 256, P3_TARGET),
    hf_batch_size=32,
)
QUICK = Plan(
    requests=8,
    lengths=(4, 8),
    concurrencies=(1, 4),
    lone_requests=2,
    poisson_requests=4,
    scaling=(8, 16),
    hf_batch_size=4,
    hf_requests=4,
    copy_mib=64,
    gemm_n=256,
    probe_repeats=1,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run on a tiny model: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default bench-results[/quick])")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="default: the converted SmolLM2 (--quick: a tiny model)"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every launcher")
    parser.add_argument("--requests", type=int, help="requests per saturated run (full: 128)")
    parser.add_argument("--concurrencies", type=_ints, help="the 8-adapter sweep, e.g. 1,4,16,32,64")
    parser.add_argument("--scaling", type=_ints, help="small adapters registered, e.g. 8,64,256,1000")
    parser.add_argument("--hf-batch-size", type=int, help="transformers+peft static batch (full: 32)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in ("requests", "concurrencies", "scaling", "hf_batch_size")}
    plan = replace(plan, **{k: v for k, v in given.items() if v is not None})
    if plan.concurrencies[0] != 1 or plan.scaling[0] != 8:
        parser.error("--concurrencies must start at 1 (the lone request) and --scaling at 8 (P3's base)")
    out_dir = args.out or ROOT / ("bench-results/quick" if args.quick else "bench-results")
    env = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = args.model_dir
        if model_dir is None and args.quick:
            model_dir = tiny_chat_model(_model_dir(None), Path(tmp))
        if model_dir:
            env["MODEL_ID"] = str(model_dir)
        results = run_suite(plan, _model_dir(model_dir), env, quick=args.quick)
    results["command"] = shlex.join(["python", "-m", "tests.bench.suite", *(argv or sys.argv[1:])])
    results["git"] = _git_state()
    results["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    plot.plot(results, out_dir / "bench.png")
    print(report(results))
    print(f"\nwrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    failed = sum(r.get("failed", 0) for r in results["runs"].values())
    return 1 if failed else 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "."))}


def _model_dir(given: Path | None) -> Path:
    if given:
        return given
    from launch.model_source import DEFAULT_CACHE_DIR, prepare_default_model

    return prepare_default_model(Path(DEFAULT_CACHE_DIR).expanduser())


def run_suite(plan: Plan, model_dir: Path, env: dict[str, str], quick: bool) -> dict:
    start = time.perf_counter()
    info = machine.describe()
    model = machine.model_size(model_dir)
    sat = plan.concurrencies[-1]
    texts = render_chat(model_dir, _prompts())
    prompt_tokens = count_tokens(model_dir, texts)
    base = build_requests(texts, plan.requests, plan.lengths, plan.seed)
    mixed = adapter_set.make_adapters(model_dir, "mixed", 8, plan.seed)
    mixed_reqs = with_adapters(base, list(mixed), "uniform", plan.seed + 2)
    setup_s = {"adapters_and_prompts": time.perf_counter() - start}
    runs: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    sweep: list[dict] = []

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        with _served("base", {}, work, env, servers) as url:
            runs["base_lone"] = _closed(url, base[: plan.lone_requests], 1, prompt_tokens)
            runs["base_saturated"] = _closed(url, base, sat, prompt_tokens)
        # What the server computes in (DTYPE=auto resolves per machine), for the probes and the baseline.
        dtype = servers["base"]["model_dtype"]
        probe_start = time.perf_counter()
        info.update(_probe_machine(plan, model_dir, dtype))
        setup_s["machine"] = time.perf_counter() - probe_start
        with _served("mixed8", mixed, work, env, servers) as url:
            for c in plan.concurrencies:
                n = max(plan.lone_requests, min(plan.requests, 4 * c))
                sweep.append({"concurrency": c, **_closed(url, mixed_reqs[:n], c, prompt_tokens)})
            runs["mixed8_lone"], runs["mixed8_saturated"] = sweep[0], sweep[-1]
            # The saturating rate: the most requests/s any concurrency sustained.
            rate = max(s["requests_per_s"] for s in sweep) / 2
            if rate <= 0:
                raise RuntimeError(f"no request completed in the concurrency sweep: {sweep}")
            reqs = mixed_reqs[: plan.poisson_requests]
            offsets = poisson_offsets(len(reqs), rate, plan.seed + 3)
            runs["mixed8_half_load"] = {"rate": rate, **summarize(loadgen.run_poisson(url, reqs, offsets))}
        # Base-only again, so that P1's reference brackets the 8-adapter runs (the host drifts by tens of
        # percent within minutes; see ratios.py).
        with _served("base_again", {}, work, env, servers) as url:
            runs["base_saturated_after"] = _closed(url, base, sat, prompt_tokens)
        scaling, why, rows, pool = _scaling(plan, model_dir, dtype)
        small = adapter_set.make_adapters(model_dir, "small", scaling[-1], plan.seed)
        points = []
        # 8 registered again at the end, so that P3's reference brackets the larger counts.
        for i, n in enumerate([*scaling, scaling[0]]):
            names = list(small)[:n]
            reqs = with_adapters(base, names, "zipf", plan.seed + 4)
            name = f"small{n}" if i < len(scaling) else f"small{n}_again"
            sized = _adapter_memory(model_dir, rows, n, pool)
            with _served(name, {k: small[k] for k in names}, work, env, servers, sized) as url:
                points.append({"registered": n, **_closed(url, reqs, sat, prompt_tokens)})
            points[-1]["server_peak_rss_bytes"] = servers[name]["peak_rss_bytes"]
        runs["small8_zipf"], runs["small8_zipf_after"] = points[0], points.pop()
        runs["many_registered"] = {**points[-1], "why": why}
        hf_reqs = mixed_reqs[: plan.hf_requests or len(mixed_reqs)]
        runs["hf_peft"] = hf_baseline.run_baseline(model_dir, mixed, hf_reqs, plan.hf_batch_size, work, dtype)
    dtypes = {name: s["model_dtype"] for name, s in servers.items()}
    if set(dtypes.values()) != {dtype}:
        raise RuntimeError(f"the servers ran in different dtypes: {dtypes}")

    for name, server in [
        ("base_lone", "base"),
        ("base_saturated", "base"),
        ("base_saturated_after", "base_again"),
    ]:
        runs[name]["server_peak_rss_bytes"] = servers[server]["peak_rss_bytes"]
    for name, run in runs.items():
        if name.startswith("mixed8"):
            run["server_peak_rss_bytes"] = servers["mixed8"]["peak_rss_bytes"]
    figures = {**runs, "machine": info, "model": model}
    return {
        "title": _title(info, quick),
        "mode": "quick" if quick else "full",
        "model_dtype": dtype,
        "plan": asdict(plan),
        "machine": info,
        "model": {**model, "dir": str(model_dir)},
        "runs": runs,
        "concurrency_sweep": sweep,
        "adapter_scaling": points,
        "servers": servers,
        "ratios": {k: r.as_dict() for k, r in ratios.compute(figures).items()},
        "setup_s": setup_s,
        "suite_wall_s": time.perf_counter() - start,
    }


def _probe_machine(plan: Plan, model_dir: Path, dtype: str) -> dict:
    """The machine's ceilings, and the floor under any step: the model's linear layers alone, at 1 row
    (P4), at the saturated batch and at a prefill's rows (the P2 and P6 bounds), all in `dtype`."""
    torch_dtype = getattr(torch, dtype)
    rows = sorted({1, plan.concurrencies[-1], ratios.PROMPT_ROWS})
    return {
        "dtype": dtype,
        "copy_bytes_per_s": machine.copy_bandwidth(plan.copy_mib * 2**20, plan.probe_repeats),
        "gemm_flops_per_s": machine.gemm_flops(plan.gemm_n, plan.probe_repeats, torch_dtype),
        "linear_pass_s": {
            str(n): machine.linear_pass_s(model_dir, n, plan.probe_repeats, torch_dtype) for n in rows
        },
    }


def _prompts() -> list[str]:
    from tests.bench.workload import load_prompts

    return load_prompts()


def _closed(url: str, requests: list[Request], concurrency: int, prompt_tokens: dict[str, int]) -> dict:
    run = summarize(loadgen.run_concurrency(url, requests, concurrency))
    return {"concurrency": concurrency, **run, "prompt_tokens": sum(prompt_tokens[r.text] for r in requests)}


def count_tokens(model_dir: Path, texts: list[str]) -> dict[str, int]:
    """Prompt tokens of each text, as the router counts them (special tokens added, none here for a
    rendered chat)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {t: len(tok(t).input_ids) for t in texts}


def _scaling(plan: Plan, model_dir: Path, dtype: str) -> tuple[list[int], str, Counter[int], torch.dtype]:
    """The registered counts whose small adapters fit in memory now, why the last one is what it is, one
    small adapter's rows (machine.lora_rows) and the pool dtype: each server's ADAPTER_MEMORY holds its
    adapters (all pinned) at their true size, and the pool is allocated whole at startup."""
    pool = machine.pool_dtype(machine.serving_device(), getattr(torch, dtype))
    one = adapter_set.make_adapter(model_dir, "small", 0, plan.seed)
    rows = machine.lora_rows(one)
    per_adapter = machine.true_lora_bytes(one, torch.empty((), dtype=pool).element_size())
    budget = machine.available_memory() - MEMORY_RESERVE
    fit = max(8, int(budget // per_adapter))
    want = plan.scaling[-1]
    counts = sorted({min(n, fit) for n in plan.scaling})
    mib, gib = 2**20, 2**30
    total = want * per_adapter
    total_text = f"{total / gib:.2f} GiB" if total >= gib else f"{total / mib:.1f} MiB"
    held = f"{want} adapters × {per_adapter / mib:.2f} MiB = {total_text} of adapter pool"
    if fit >= want:
        why = f"fits: {held}"
    else:
        why = f"{held} exceed {budget / gib:.1f} GiB (available memory less {MEMORY_RESERVE / gib:.0f} GiB)"
    return counts, why, rows, pool


def _adapter_memory(model_dir: Path, rows: Counter[int], n: int, pool: torch.dtype) -> dict[str, str]:
    """ADAPTER_MEMORY for a server holding n adapters of `rows` each."""
    held = Counter({w: k * n for w, k in rows.items()})
    return {"ADAPTER_MEMORY": str(machine.adapter_memory_for(model_dir, held, pool))}


@contextlib.contextmanager
def _served(
    name: str,
    adapters: dict[str, Path],
    work: Path,
    env: dict[str, str],
    record: dict,
    sized: dict[str, str] | None = None,
):
    """A fresh launcher serving `adapters`; yields its URL after one untimed warm-up request. `sized`:
    settings the suite chose for this server (ADAPTER_MEMORY), under those given with --env."""
    server_env = {**(sized or {}), **env, "LORA_ADAPTERS": adapter_set.launcher_spec(adapters)}
    server = Server(work / f"{name}.log", env=server_env)
    t0 = time.perf_counter()
    entry = {"registered": len(adapters)}
    if "ADAPTER_MEMORY" in server_env:
        entry["adapter_memory"] = server_env["ADAPTER_MEMORY"]  # as given: bytes, or e.g. "2GiB"
    with RssMonitor(server.proc.pid) as rss:
        try:
            server.wait_ready(timeout=1800)
            entry["startup_s"] = time.perf_counter() - t0
            entry["model_dtype"] = json.loads(get(server.url + "/info")[1])["model_dtype"]
            first = next(iter(adapters), None)
            loadgen.run_concurrency(server.url, [Request(0, "Hello", 2, first)], 1)
            yield server.url
        finally:
            entry["exit_code"] = server.stop()
    entry["peak_rss_bytes"] = rss.peak_bytes
    entry["total_s"] = time.perf_counter() - t0  # startup, runs and shutdown
    record[name] = entry


def _title(info: dict, quick: bool) -> str:
    mode = "QUICK (harness check, not a measurement)" if quick else "full"
    return f"multilora bench, {mode}: {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}"


def report(results: dict) -> str:
    """Every run side by side, then the ratios against their targets."""
    m = results["machine"]
    lines = [
        results["title"],
        f"copy bandwidth {m['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write), "
        f"{m['dtype']} GEMM {m['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s, "
        f"model {results['model']['parameters'] / 1e6:.1f}M parameters, "
        f"{results['model']['weight_bytes'] / 2**20:.0f} MiB, served in {results['model_dtype']}; "
        f"load average {m['load_average_1min']:.1f} at the start (other work on the machine makes every "
        "figure noisy)",
        "the model's linear layers alone, one pass: "
        + ", ".join(f"{t * 1e3:.1f} ms at {rows} row(s)" for rows, t in m.get("linear_pass_s", {}).items()),
        "",
        f"{'run':<22} {'conc':>5} {'reqs':>5} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'p99':>8} "
        f"{'ITL p50':>8} {'p99':>8} {'early':>5} {'RSS GiB':>7}",
    ]
    rows = [(k, v) for k, v in results["runs"].items()]
    rows += [(f"mixed8 c={s['concurrency']}", s) for s in results["concurrency_sweep"][1:-1]]
    rows += [(f"small{s['registered']} zipf", s) for s in results["adapter_scaling"][1:-1]]
    for name, r in rows:
        rss = r.get("server_peak_rss_bytes", r.get("peak_rss_bytes"))
        lines.append(
            f"{name:<22} {r.get('concurrency', r.get('batch_size', '-')):>5} {r['requests']:>5} "
            f"{r['output_tokens_per_s']:>8.1f} {r['requests_per_s']:>7.2f} {_ms(r.get('ttft_p50_s')):>9} "
            f"{_ms(r.get('ttft_p99_s')):>8} {_ms(r.get('itl_p50_s')):>8} {_ms(r.get('itl_p99_s')):>8} "
            f"{r.get('early_stops', '-'):>5} {'-' if rss is None else f'{rss / 2**30:.2f}':>7}"
        )
    lines += [
        "",
        "servers: " + ", ".join(_server_line(k, v) for k, v in results["servers"].items()),
        f"transformers+peft ({results['runs']['hf_peft']['dtype']}): "
        f"{results['runs']['hf_peft']['total_s']:.0f} s; "
        f"suite: {results['suite_wall_s']:.0f} s",
        "",
        ratios.table(results["ratios"]),
    ]
    return "\n".join(lines)


def _server_line(name: str, s: dict) -> str:
    up = s.get("startup_s", float("nan"))
    memory = f", ADAPTER_MEMORY={s['adapter_memory']}" if "adapter_memory" in s else ""
    return f"{name} ({s['registered']} adapters{memory}, up in {up:.0f} s, {s['total_s']:.0f} s in all)"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}ms"


if __name__ == "__main__":
    sys.exit(main())
