"""Issue 15's adapter benchmark: memory, cold start, loads beside running requests, 10,000 adapters.

    .venv/bin/python -m tests.bench.bench_adapters [--quick] [--dtype D] [--out FILE]    # make bench-adapters

Each part runs against a fresh `launcher.py` (harness.running) that finds its adapters at runtime, under
LORA_ADAPTER_ROOTS or in a temporary Hugging Face cache, and prints one table: figure, target, met.
1. Memory: N adapters of mixed ranks (4-64) and module sets (adapter_set `ranks`) loaded by first
   requests, into a server whose ADAPTER_MEMORY holds MEMORY_SLACK x their rows in whole pages
   (machine.adapter_memory_for: the pool's own page size and allocator) and ADAPTER_HOST_MEMORY=0.
   (a) The pool bytes they take (`multilora_adapter_bytes_used{tier="device"}`: the pages holding rows,
   as the LoadAdapter replies report them) over their true size: the A and B elements of their files x
   the pool's element size (cross-checked against each adapter's bytes in GET /v1/adapters). (b) The
   server's resident memory (PSS summed over its process tree, rss_monitor: each rank's adapter reader
   shares its pages with the rank, which a sum of RSS would count twice) after the loads minus that of
   the same server with LoRA off (MAX_LORA_ADAPTERS=0: no pool, no reader), over their files' bytes: the
   target's figure. The growth over the loads alone is printed beside it: the rows, plus what a load
   adds besides them (the CPU ops' cached copies, buffers).
2. Cold start: for each of several ~10 MB adapters (`cold`: r8 on all seven) in the HF cache, the TTFT of
   its first request minus that of a second one, with the worker's load time (its log) and the router's
   LoadAdapter round trip (its log; multilora_adapter_load_duration sums them). ADAPTER_MEMORY holds
   every adapter of parts 2 and 3, so no load waits for an eviction.
3. Loads beside others: long generations stream (base and a pinned adapter) throughout while, in turn,
   bursts of `burst` first requests for new adapters (cold: each waits for a load) and the same requests
   again (warm) run. Each streamed gap counts in the window its later token fell in (a warm window lasts
   as long as the cold one before it): ITL p50 in the cold windows over ITL p50 in the warm ones (the
   same extra requests and prefills, no loads); quiet is neither.
4. Scale: `scale_adapters` small adapters (r8 on q, v) under a root, ADAPTER_MEMORY holding a few hundred
   of them (`scale_resident`; MAX_LORA_ADAPTERS auto, a count above that, so the pool is what evicts,
   into the host tier); the same seeded requests at concurrency 64 with zipf popularity over the 8 most
   popular, over all of them, the 8 again, all again (most now resident), the 8 again: each pass over
   all is compared with the runs over the 8 on either side of it (hosts drift within minutes). The
   adapters that any request names get their own weights; the others are hard links to one adapter's
   files (the server never reads them; they make the root as large as stated).

--quick checks the harness on a tiny random Llama (adapter_factory.tiny_chat_model) with few adapters
and requests; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tests.adapter_factory import place_in_hf_cache, tiny_chat_model
from tests.bench import adapter_set, loadgen, machine
from tests.bench.adapter_report import report
from tests.bench.figures import percentile, summarize
from tests.bench.rss_monitor import RssMonitor
from tests.bench.suite import _model_dir
from tests.bench.workload import Request, build_requests, load_prompts, render_chat, with_adapters
from tests.e2e.harness import get, running

MEMORY_RESERVE = 4 * 2**30  # of MemAvailable, left for the model, KV cache, router and clients
MEMORY_SLACK = 1.05  # part 1's ADAPTER_MEMORY: this x its adapters' rows, in whole pages


@dataclass(frozen=True)
class Plan:
    memory_adapters: int  # adapter_set `ranks`, cycling over its 15 (rank, modules) specs
    cold_adapters: int  # cold starts measured one at a time
    burst: int  # first requests per cold burst
    rounds: int  # cold and warm bursts, in turn
    quiet_s: float  # between bursts
    background: int  # long generations streaming throughout
    background_tokens: int
    scale_adapters: int
    scale_resident: int  # small adapters the scale server's ADAPTER_MEMORY holds
    scale_requests: int
    scale_concurrency: int
    scale_lengths: tuple[int, int]
    seed: int = 0


FULL = Plan(15, 6, 20, 3, 3.0, 4, 256, 10_000, 200, 384, 64, (32, 96))
QUICK = Plan(15, 2, 4, 1, 0.5, 2, 48, 64, 8, 32, 8, (4, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run on a tiny model: checks the harness")
    parser.add_argument("--dtype", default=None, help="DTYPE of the servers (default auto)")
    parser.add_argument(
        "--load-priority", default=None, help="ADAPTER_LOAD_PRIORITY of the servers (default idle)"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="default: SmolLM2 (--quick: a tiny model)"
    )
    parser.add_argument("--scale-adapters", type=int, help="adapters under the scale root (full: 10000)")
    parser.add_argument("--scale-requests", type=int, help="requests per scale run (full: 384)")
    parser.add_argument("--parts", default="memory,cold,scale", help="which parts to run (cold: 2 and 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    given = {"scale_adapters": args.scale_adapters, "scale_requests": args.scale_requests}
    plan = replace(plan, **{k: v for k, v in given.items() if v is not None})
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None and args.quick:
            model_dir = tiny_chat_model(_model_dir(None), work / "model")
        model_dir = _model_dir(model_dir)
        env = {"MODEL_ID": str(model_dir), **({"DTYPE": args.dtype} if args.dtype else {})}
        if args.load_priority is not None:
            env["ADAPTER_LOAD_PRIORITY"] = args.load_priority
        results = {"machine": _machine(), "plan": asdict(plan), "model_dir": str(model_dir)}
        texts = render_chat(model_dir, load_prompts())
        if "memory" in parts:
            results["memory"] = memory(plan, model_dir, env, work)
        if "cold" in parts:
            results["cold"] = cold_and_stall(plan, model_dir, env, work, texts)
        if "scale" in parts:
            results["scale"] = scale(plan, model_dir, env, work, texts)
    results["command"] = shlex.join(["python", "-m", "tests.bench.bench_adapters", *(argv or sys.argv[1:])])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(report(results, args.quick))
    return 0 if all(r.get("failed", 0) == 0 for r in results.values() if isinstance(r, dict)) else 1


def _machine() -> dict:
    from launch.dtype import cpu_facts

    return {**machine.describe(), "avx512_bf16": cpu_facts().avx512_bf16}


# ---- 1. memory ----------------------------------------------------------------------------------------


def memory(plan: Plan, model_dir: Path, env: dict, work: Path) -> dict:
    n = plan.memory_adapters
    specs = [adapter_set.adapter_spec("ranks", i) for i in range(n)]
    made = {
        f"r{r}-{len(t)}m-{i}": adapter_set.make_adapter(model_dir, "ranks", i)
        for i, (r, t) in enumerate(specs)
    }
    root = adapter_set.link_root(work / "memory-root", made)
    pool = _pool_dtype(env)
    element_size = torch.empty((), dtype=pool).element_size()
    true = {name: machine.true_lora_bytes(d, element_size) for name, d in made.items()}
    rows = sum((machine.lora_rows(d) for d in made.values()), Counter())
    adapter_memory = machine.adapter_memory_for(model_dir, rows, pool, MEMORY_SLACK)
    env = {**env, "LORA_ADAPTER_ROOTS": str(root)}
    # LoRA off: no adapter pool and no adapter reader process.
    with running(work / "memory-lora-off.log", {**env, "MAX_LORA_ADAPTERS": "0"}) as server:
        _requests(server.url, [Request(0, "Hello", 1)])
        lora_off = _settled_rss(server.proc.pid)
    sized = {**env, "ADAPTER_MEMORY": str(adapter_memory), "ADAPTER_HOST_MEMORY": "0"}
    with running(work / "memory.log", sized) as server:
        _check_pool_dtype(_info(server.url), pool)
        _requests(server.url, [Request(0, "Hello", 1)])  # the base path warm
        before = _settled_rss(server.proc.pid)
        with RssMonitor(server.proc.pid, proportional=True) as peak:
            run = _requests(server.url, [Request(i, "Hello", 1, name) for i, name in enumerate(made)])
        after = _settled_rss(server.proc.pid)
        listed = {a["name"]: a for a in json.loads(get(server.url + "/v1/adapters")[1])["adapters"]}
        samples = _metrics(server.url)
    reported = {name: listed.get(name, {}).get("bytes", {}).get("device", 0) for name in made}
    resident = [name for name in made if reported[name]]
    held = _metric(samples, "multilora_adapter_bytes_used", tier="device")
    files = sum(_file_bytes(d) for d in made.values())
    return {
        "adapters": n,
        "resident": len(resident),
        "evictions": round(_metric(samples, "multilora_adapter_evictions_total")),
        # Every adapter must stay resident: the pool is sized for them all, and (b) assumes it.
        "failed": run["failed"] + n - len(resident),
        "first_error": run.get("first_error"),
        "lora_dtype": str(pool).removeprefix("torch."),
        "adapter_memory": adapter_memory,
        "pool_bytes_total": round(_metric(samples, "multilora_adapter_bytes_total", tier="device")),
        "pool_bytes_used": round(held),
        "true_bytes": sum(true.values()),
        "true_bytes_match_server": all(reported[k] == true[k] for k in made),
        "file_bytes": files,
        "rss_lora_off": lora_off,
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak.peak_bytes,
        "memory_held": held / max(1, sum(true[k] for k in resident)),
        "memory_rss": (after - lora_off) / files,  # the target's figure
        "memory_rss_growth": (after - before) / files,
    }


def _file_bytes(adapter_dir: Path) -> int:
    return sum((adapter_dir / f).stat().st_size for f in ("adapter_config.json", adapter_set.WEIGHTS))


def _settled_rss(pid: int, samples: int = 5, interval_s: float = 0.3) -> int:
    """The tree's PSS once it stops moving: the last of a few samples."""
    monitor = RssMonitor(pid, proportional=True)
    for _ in range(samples - 1):
        monitor.sample()
        time.sleep(interval_s)
    return monitor.sample()


# ---- 2 and 3. cold start, loads beside running requests ---------------------------------------------------


def cold_and_stall(plan: Plan, model_dir: Path, env: dict, work: Path, texts: list[str]) -> dict:
    cache = work / "hf-cache"
    count = plan.cold_adapters + plan.burst * plan.rounds
    ids = [f"bench/cold-{i:03d}" for i in range(count)]
    for i, repo in enumerate(ids):
        place_in_hf_cache(adapter_set.make_adapter(model_dir, "cold", i), cache, repo)
    pinned = adapter_set.make_adapter(model_dir, "small", 0)
    pool = _pool_dtype(env)
    one = machine.lora_rows(adapter_set.make_adapter(model_dir, "cold", 0))
    rows = Counter({w: k * count for w, k in one.items()}) + machine.lora_rows(pinned)
    env = {
        **env,
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "LORA_ADAPTERS": f"resident={pinned}",
        "ADAPTER_MEMORY": str(machine.adapter_memory_for(model_dir, rows, pool)),  # all at once
    }
    with running(work / "cold.log", env) as server:
        _check_pool_dtype(_info(server.url), pool)
        _requests(server.url, [Request(0, texts[0], 2), Request(1, texts[0], 2, "resident")])
        starts = []
        for i, repo in enumerate(ids[: plan.cold_adapters]):
            cold = _requests(server.url, [Request(i, texts[0], 2, repo)], raw=True)[0]
            warm = _requests(server.url, [Request(i, texts[0], 2, repo)], raw=True)[0]
            starts.append({"adapter": repo, "cold_ttft_s": cold.ttft, "warm_ttft_s": warm.ttft})
        stall = asyncio.run(_stall(server.url, plan, texts, ids[plan.cold_adapters :]))
        log = server.log()
    file_mb = _file_bytes(adapter_set.make_adapter(model_dir, "cold", 0)) / 1e6
    figures = {"file_mb": file_mb, **_cold_figures(starts, log), **stall}
    return {**figures, "failed": figures["failed"] + stall["burst_failed"]}


def _cold_figures(starts: list[dict], log: str) -> dict:
    worker_ms, router_s = _load_times(log)
    for s in starts:
        s["delta_s"] = (
            None if None in (s["cold_ttft_s"], s["warm_ttft_s"]) else s["cold_ttft_s"] - s["warm_ttft_s"]
        )
        s["tier"], s["worker_load_ms"] = worker_ms.get(s["adapter"], (None, None))
        s["rpc_s"] = router_s.get(s["adapter"])
    deltas = [s["delta_s"] for s in starts if s["delta_s"] is not None]
    return {
        "starts": starts,
        "failed": len(starts) - len(deltas),
        "cold_median": statistics.median(deltas) if deltas else None,
        "cold_max": max(deltas) if deltas else None,
    }


WORKER_LOAD = re.compile(
    r"adapter '([^']+)' in slot \d+ as generation \d+ \(r=\d+, [\d.]+ MB, from (\w+), ([\d.]+) ms\)"
)
ROUTER_LOAD = re.compile(
    r"Loaded adapter (\S+) \(\S+\) into slot \d+ as generation \d+ from \w+ in ([\d.]+) s"
)


def _load_times(log: str) -> tuple[dict[str, tuple[str, float]], dict[str, float]]:
    """From the server's log: each adapter's first load as the worker timed it (where from: host or
    disk; ms: read, convert, place) and as the router did (s: the LoadAdapter round trip on every rank)."""
    worker: dict[str, tuple[str, float]] = {}
    for m in WORKER_LOAD.finditer(log):
        worker.setdefault(m[1], (m[2], float(m[3])))
    router: dict[str, float] = {}
    for m in ROUTER_LOAD.finditer(log):
        router.setdefault(m[1], float(m[2]))
    return worker, router


async def _stall(url: str, plan: Plan, texts: list[str], cold_ids: list[str]) -> dict:
    long = [
        Request(i, texts[i % len(texts)], plan.background_tokens, None if i % 2 else "resident")
        for i in range(100 * plan.background)
    ]
    stop = asyncio.Event()
    background = asyncio.create_task(loadgen.closed_loop(url, long, plan.background, stop))
    windows: list[tuple[str, float, float]] = []
    bursts = []
    await asyncio.sleep(2 * plan.quiet_s)  # every stream past its prefill
    for r in range(plan.rounds):
        batch = cold_ids[r * plan.burst : (r + 1) * plan.burst]
        for kind in ("cold", "warm"):
            await asyncio.sleep(plan.quiet_s)
            reqs = [Request(i, "Hello", 1, a) for i, a in enumerate(batch)]
            start = time.perf_counter()
            run = await loadgen.closed_loop(url, reqs, len(reqs))
            # The warm window spans as long as the cold one: the same prefills, then decode steps alone.
            span = max(time.perf_counter() - start, windows[-1][2] - windows[-1][1] if kind == "warm" else 0)
            await asyncio.sleep(start + span - time.perf_counter())
            windows.append((kind, start, start + span))
            bursts.append({"kind": kind, **summarize(run)})
    await asyncio.sleep(plan.quiet_s)
    stop.set()
    streams = await background
    quiet = (windows[0][1] - plan.quiet_s, windows[-1][2] + plan.quiet_s)
    gaps = split_gaps([r for r in streams.records if r.ok], windows, quiet)
    p50 = {kind: percentile(g, 50) for kind, g in gaps.items()}
    return {
        "itl_p50_s": p50,
        "gaps": {kind: len(g) for kind, g in gaps.items()},
        "bursts": bursts,
        "burst_failed": sum(b["failed"] for b in bursts),
        "stall": p50["cold"] / p50["warm"] if p50.get("cold") and p50.get("warm") else None,
        "cold_burst_s": [round(end - start, 3) for kind, start, end in windows if kind == "cold"],
    }


def split_gaps(
    records: list[loadgen.Record], windows: list[tuple[str, float, float]], quiet: tuple[float, float]
) -> dict[str, list[float]]:
    """The inter-token gaps of `records` by the window (kind, start, end) their later token fell in;
    "quiet" for those in none but inside the `quiet` span (start, end)."""
    out: dict[str, list[float]] = {"quiet": [], **{kind: [] for kind, _, _ in windows}}
    for rec in records:
        t = rec.token_times
        for prev, now in zip(t, t[1:], strict=False):
            kind = next((k for k, start, end in windows if start <= now <= end), "quiet")
            if kind != "quiet" or quiet[0] <= now <= quiet[1]:
                out[kind].append(now - prev)
    return out


# ---- 4. scale ---------------------------------------------------------------------------------------------


def scale(plan: Plan, model_dir: Path, env: dict, work: Path, texts: list[str]) -> dict:
    names = [f"s{i:05d}" for i in range(plan.scale_adapters)]
    base = build_requests(texts, plan.scale_requests, plan.scale_lengths, plan.seed)
    top = with_adapters(base, names[:8], "zipf", plan.seed + 1)
    every = with_adapters(base, names, "zipf", plan.seed + 1)
    used = {r.adapter for r in top + every}
    shared = adapter_set.make_adapter(model_dir, "small", 0)
    dirs = {
        n: adapter_set.make_adapter(model_dir, "small", i) if n in used else shared
        for i, n in enumerate(names)
    }
    root = adapter_set.link_root(work / "scale-root", dirs)
    pool = _pool_dtype(env)
    adapter_memory, resident, why = _scale_memory(plan, model_dir, shared, pool)
    env = {**env, "LORA_ADAPTER_ROOTS": str(root), "ADAPTER_MEMORY": str(adapter_memory)}
    runs = {}
    with running(work / "scale.log", env) as server:
        _check_pool_dtype(_info(server.url), pool)
        _requests(server.url, [Request(i, "Hello", 1, n) for i, n in enumerate(names[:8])])
        # Each pass over all is bracketed by runs over the 8: the host drifts within minutes.
        for name, reqs in (
            ("top8", top),
            ("all", every),
            ("top8_2", top),
            ("all_again", every),
            ("top8_3", top),
        ):
            m0 = _metrics(server.url)
            run = summarize(loadgen.run_concurrency(server.url, reqs, plan.scale_concurrency))
            m1 = _metrics(server.url)
            runs[name] = {**run, "distinct_adapters": len({r.adapter for r in reqs}), **_load_counts(m0, m1)}
    tok_s = {name: run["output_tokens_per_s"] for name, run in runs.items()}
    return {
        "adapters": plan.scale_adapters,
        "own_weights": len(used),
        "resident": resident,
        "adapter_memory": adapter_memory,
        "memory_why": why,
        "runs": runs,
        "failed": sum(r["failed"] for r in runs.values()),
        "scale": tok_s["all"] / statistics.mean([tok_s["top8"], tok_s["top8_2"]]),
        "scale_again": tok_s["all_again"] / statistics.mean([tok_s["top8_2"], tok_s["top8_3"]]),
    }


def _scale_memory(plan: Plan, model_dir: Path, small: Path, pool: torch.dtype) -> tuple[int, int, str]:
    """(ADAPTER_MEMORY, the small adapters it holds, why): `scale_resident` of them, fewer if that does not
    fit in memory now."""
    one = machine.lora_rows(small)
    per_adapter = machine.true_lora_bytes(small, torch.empty((), dtype=pool).element_size())
    budget = machine.available_memory() - MEMORY_RESERVE
    resident = max(8, min(plan.scale_resident, int(budget // per_adapter)))
    held = Counter({w: k * resident for w, k in one.items()})
    adapter_memory = machine.adapter_memory_for(model_dir, held, pool)
    cut = (
        ""
        if resident == plan.scale_resident
        else f" (cut from {plan.scale_resident} to fit {budget / 2**30:.1f} GiB)"
    )
    why = (
        f"ADAPTER_MEMORY {adapter_memory / 2**20:.1f} MiB holds {resident} of them at "
        f"{per_adapter / 2**20:.2f} MiB{cut}"
    )
    return adapter_memory, resident, why


def _load_counts(before: dict, after: dict) -> dict:
    def diff(name: str, **labels) -> int:
        return round(_metric(after, name, **labels) - _metric(before, name, **labels))

    return {
        "loads": diff("multilora_adapter_loads_total", result="ok"),
        "failed_loads": diff("multilora_adapter_loads_total", result="failed"),
        "evictions": diff("multilora_adapter_evictions_total"),
        "hits_host": diff("multilora_adapter_hits_total", tier="host"),
        "hits_disk": diff("multilora_adapter_hits_total", tier="disk"),
    }


# ---- the server -------------------------------------------------------------------------------------------


def _requests(url: str, requests: list[Request], raw: bool = False):
    """The requests one at a time; their figures (summarize), or with `raw` their records."""
    run = loadgen.run_concurrency(url, requests, 1)
    return run.records if raw else summarize(run)


def _info(url: str) -> dict:
    return json.loads(get(url + "/info")[1])


def _pool_dtype(env: dict) -> torch.dtype:
    """The adapter pool's dtype the servers get (DEVICE auto; DTYPE as given, else auto), as the launcher
    resolves them: ADAPTER_MEMORY is sized in it before a server starts (`_check_pool_dtype` after)."""
    from launch.dtype import auto_dtype

    device = machine.serving_device()
    return machine.pool_dtype(device, getattr(torch, env.get("DTYPE") or auto_dtype(device).dtype))


def _check_pool_dtype(info: dict, expected: torch.dtype) -> None:
    """Refuse a server whose pool dtype (from its /info) is not the one its ADAPTER_MEMORY was sized in."""
    got = machine.pool_dtype(info["model_device_type"], getattr(torch, info["model_dtype"]))
    if got != expected:
        raise RuntimeError(f"the server's adapter pool is {got}, its ADAPTER_MEMORY was sized for {expected}")


def _metrics(url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    status, raw = get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics: {status} {raw[:200]!r}")
    return [s for family in text_string_to_metric_families(raw.decode()) for s in family.samples]


def _metric(samples: list, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


if __name__ == "__main__":
    sys.exit(main())
