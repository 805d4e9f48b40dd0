"""TTFT under Poisson arrivals for several WAITING_SERVED_RATIO values (the joining policy), one server each.

Serves the suite's 8 mixed adapters, times a few lone requests (TTFT of a request alone), then the same
requests arriving as a Poisson process, and prints TTFT, ITL and throughput per ratio and arrival seed:

    .venv/bin/python -m tests.bench.bench_joining [--ratios 0.3,0] [--seeds 3,7] [--rate 0.6] [--requests 48]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.bench import adapter_set, loadgen
from tests.bench.figures import summarize
from tests.bench.suite import FULL, _model_dir, _prompts
from tests.bench.workload import Request, build_requests, poisson_offsets, render_chat, with_adapters
from tests.e2e.harness import Server

LONE_REQUESTS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3,0")
    parser.add_argument("--seeds", default="3,7", help="arrival seeds (offsets to the suite's seed)")
    parser.add_argument("--rate", type=float, default=0.6, help="requests/s")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    model_dir = _model_dir(None)
    base = build_requests(render_chat(model_dir, _prompts()), args.requests, FULL.lengths, FULL.seed)
    adapters = adapter_set.make_adapters(model_dir, "mixed", 8, FULL.seed)
    reqs = with_adapters(base, list(adapters), "uniform", FULL.seed + 2)
    header = ("ratio", "seed", "lone TTFT", "TTFT p50", "p99", "ITL p50", "p99", "tok/s")
    print(" ".join(f"{h:>9}" for h in header))
    for ratio in args.ratios.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            env = {"WAITING_SERVED_RATIO": ratio, "LORA_ADAPTERS": adapter_set.launcher_spec(adapters)}
            server = Server(Path(tmp) / "launcher.log", env=env)
            try:
                server.wait_ready(timeout=600)
                loadgen.run_concurrency(server.url, [Request(0, "Hello", 2, next(iter(adapters)))], 1)
                lone = summarize(loadgen.run_concurrency(server.url, reqs[:LONE_REQUESTS], 1))
                for seed in (int(s) for s in args.seeds.split(",")):
                    offsets = poisson_offsets(len(reqs), args.rate, FULL.seed + seed)
                    run = summarize(loadgen.run_poisson(server.url, reqs, offsets))
                    ms = [
                        f"{s * 1000:.0f} ms"
                        for s in (lone["ttft_p50_s"], *(run[k] for k in ("ttft_p50_s", "ttft_p99_s")))
                    ] + [f"{run[k] * 1000:.0f} ms" for k in ("itl_p50_s", "itl_p99_s")]
                    row = (ratio, seed, *ms, f"{run['output_tokens_per_s']:.1f}")
                    print(" ".join(f"{v:>9}" for v in row))
            finally:
                server.stop()


if __name__ == "__main__":
    main()
