"""Serving benchmark: N requests at a fixed concurrency spread over several adapters, against a server.

    .venv/bin/python -m tests.bench.bench_serving --launch            # start launcher.py itself (SmolLM2)
    .venv/bin/python -m tests.bench.bench_serving --url http://127.0.0.1:3000 --adapters pirate,robot

Prints generated tokens/s (all generated tokens / wall time) and latency percentiles. TTFT needs a token
stream: when the server has `/generate_stream` the requests stream and TTFT is the time to the first
token event; otherwise the requests use `/generate` and only the time to the full response is reported
(labelled as such, never as TTFT). `--launch` serves the default model with 8 adapter ids cycling over
the committed demo adapters (8 slots, so 8 LoRA segments per mixed batch, with 2 distinct weight sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import ROOT, Server, post

PROMPTS = [
    "Hello who are you?",
    "Tell me about volcanoes.",
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Give me one fact about the moon.",
    "Describe a thunderstorm in one sentence.",
    "Why is the sky blue?",
    "What are bees good for?",
]


@dataclass
class Result:
    latency_s: float
    ttft_s: float | None
    tokens: int
    ok: bool
    error: str = ""


def one_request(url: str, prompt: str, adapter: str | None, max_new_tokens: int, stream: bool) -> Result:
    params: dict = {"max_new_tokens": max_new_tokens, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    start = time.perf_counter()
    if not stream:
        try:
            status, body = post(url + "/generate", {"inputs": prompt, "parameters": params}, timeout=600)
        except OSError as err:
            return Result(time.perf_counter() - start, None, 0, False, repr(err))
        latency = time.perf_counter() - start
        if status != 200:
            return Result(latency, None, 0, False, f"{status} {body}")
        return Result(latency, None, body["details"]["generated_tokens"], True)
    request = urllib.request.Request(
        url + "/generate_stream",
        data=json.dumps({"inputs": prompt, "parameters": params}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    ttft, tokens = None, 0
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return Result(time.perf_counter() - start, ttft, tokens, False, event["error"])
                if event.get("token") is not None:
                    tokens += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - start
    except (OSError, ValueError) as err:
        return Result(time.perf_counter() - start, ttft, tokens, False, repr(err))
    return Result(time.perf_counter() - start, ttft, tokens, True)


def has_stream(url: str) -> bool:
    request = urllib.request.Request(
        url + "/generate_stream",
        data=json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 1}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
            return True
    except urllib.error.HTTPError as err:
        return err.code not in (404, 405)
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def bench(url: str, adapters: list[str], n: int, concurrency: int, max_new_tokens: int) -> dict:
    stream = has_stream(url)
    jobs = [(PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)] if adapters else None) for i in range(n)]
    one_request(url, PROMPTS[0], jobs[0][1], 4, stream)  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: one_request(url, *job, max_new_tokens, stream), jobs))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    report = {
        "requests": n,
        "concurrency": concurrency,
        "adapters": len(adapters),
        "max_new_tokens": max_new_tokens,
        "failed": n - len(ok),
        "wall_s": round(wall, 2),
        "generated_tokens": sum(r.tokens for r in ok),
        "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 1),
        "mode": "stream" if stream else "non-streaming",
    }
    latencies = [r.latency_s for r in ok]
    if latencies:
        report["latency_p50_s"] = round(percentile(latencies, 50), 3)
        report["latency_p99_s"] = round(percentile(latencies, 99), 3)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    if ttfts:
        report["ttft_p50_s"] = round(percentile(ttfts, 50), 3)
        report["ttft_p99_s"] = round(percentile(ttfts, 99), 3)
    if len(ok) < n:
        report["first_error"] = next(r.error for r in results if not r.ok)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--launch", action="store_true", help="start launcher.py on a free port")
    parser.add_argument("--adapters", default=None, help="comma-separated adapter ids (--url; default: base)")
    parser.add_argument("--num-adapters", type=int, default=8, help="adapter ids to serve with --launch")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the launcher (--launch)")
    args = parser.parse_args(argv)
    if args.url:
        adapters = args.adapters.split(",") if args.adapters else []
        print(json.dumps(bench(args.url, adapters, args.requests, args.concurrency, args.max_new_tokens)))
        return 0
    demo = sorted(p for p in (ROOT / "demo_adapters").iterdir() if (p / "adapter_config.json").is_file())
    adapters = [f"{demo[i % len(demo)].name}-{i}" for i in range(args.num_adapters)]
    env = {"LORA_ADAPTERS": ",".join(f"{a}={demo[i % len(demo)]}" for i, a in enumerate(adapters))}
    env.update(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "launcher.log", env=env)
        try:
            server.wait_ready(timeout=600)
            report = bench(server.url, adapters, args.requests, args.concurrency, args.max_new_tokens)
        finally:
            code = server.stop()
        report["launcher_exit"] = code
        print(json.dumps(report))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
