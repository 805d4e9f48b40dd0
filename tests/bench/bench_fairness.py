"""Issue 16's fairness figure: one request for adapter B behind a backlog of 48 for adapter A.

    .venv/bin/python -m tests.bench.bench_fairness [--quick] [--backlog 48] [--tokens 16]

One server (`harness.Server`: SmolLM2, or with --quick the e2e tests' tiny random Llama) with
MAX_BATCH_SIZE=4 and two small adapters, A and B. After a warm-up request for each, `--backlog` streaming
requests for A are sent at once; once the server has taken them all (`tgi_request_count{adapter="A"}`)
and its batch is full (`tgi_batch_current_size`), one request for B follows. A "batch turn" is the
median end-to-end time of the first 4 A requests to finish (the first batch); the figure is B's time to
first token in batch turns. Every request has the same prompt and is greedy, so the A requests all take
about one turn. Target: at most 2 (with a FIFO queue B waits for 44 A admissions: about 11). Once B has
finished and so have the first 4 A requests, the rest of A's backlog is abandoned (the server cancels
it), so the run takes a few turns, not 12.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.bench import adapter_set, loadgen
from tests.bench.suite import _model_dir, tiny_chat_model
from tests.bench.workload import Request, render_chat
from tests.e2e.harness import Server

BATCH_SIZE = 4
TARGET_TURNS = 2.0
PROMPT = "Write a long story about a lighthouse keeper and the ships she watches."


@dataclass(frozen=True)
class Outcome:
    turn_s: float  # median end-to-end time of the first BATCH_SIZE A requests to finish
    b_ttft_s: float
    a_waiting: int  # A requests waiting when B was sent
    a_done_before_b: int  # A requests that finished before B's first token


async def _metric(session: aiohttp.ClientSession, url: str, name: str, adapter: str | None = None) -> int:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    labels = "" if adapter is None else f'{{adapter="{re.escape(adapter)}"}}'
    found = re.search(rf"^{name}{labels} (\d+)", text, re.M)
    return int(found.group(1)) if found else 0


async def _until(check, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _scenario(url: str, prompt: str, backlog: int, tokens: int) -> Outcome:
    a = [loadgen.Record(Request(i, prompt, tokens, "A")) for i in range(backlog)]
    b = loadgen.Record(Request(backlog, prompt, tokens, "B"))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=loadgen.TIMEOUT, connector=connector) as session:
        taken = await _metric(session, url, "tgi_request_count", "A")
        a_tasks = [asyncio.ensure_future(loadgen._one(session, url, rec)) for rec in a]

        async def backlogged() -> bool:
            count = await _metric(session, url, "tgi_request_count", "A")
            return count >= taken + backlog and await _metric(session, url, "tgi_batch_current_size") >= 4

        await _until(backlogged, "A's backlog and a full batch")
        a_waiting = await _metric(session, url, "multilora_queue_size", "A")
        await loadgen._one(session, url, b)

        async def first_batch_done() -> bool:
            return sum(r.finish_reason is not None for r in a) >= BATCH_SIZE

        await _until(first_batch_done, "the first A requests")
        for task in a_tasks:
            task.cancel()
        await asyncio.gather(*a_tasks, return_exceptions=True)
    failed = [r.error for r in (*a, b) if r.error is not None]
    if failed or b.ttft is None:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[:1]}")
    done = sorted((r for r in a if r.ok), key=lambda r: r.token_times[-1])
    first_token = b.token_times[0]
    return Outcome(
        turn_s=statistics.median(r.token_times[-1] - r.sent for r in done[:BATCH_SIZE]),
        b_ttft_s=b.ttft,
        a_waiting=a_waiting,
        a_done_before_b=sum(r.token_times[-1] < first_token for r in done),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama (figures mean little)")
    parser.add_argument("--backlog", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens of every request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        work = Path(tmp)
        model_dir = tiny_chat_model(_model_dir(None), work / "model") if args.quick else _model_dir(None)
        made = adapter_set.make_adapters(model_dir, "small", 2, seed=16)
        adapters = dict(zip(("A", "B"), made.values(), strict=True))
        env = {
            "MODEL_ID": str(model_dir),
            "MAX_BATCH_SIZE": str(BATCH_SIZE),
            "LORA_ADAPTERS": adapter_set.launcher_spec(adapters),
        }
        (prompt,) = render_chat(model_dir, [PROMPT])
        server = Server(work / "launcher.log", env=env)
        try:
            server.wait_ready(timeout=600)
            for name in adapters:
                loadgen.run_concurrency(server.url, [Request(0, prompt, args.tokens, name)], 1)
            started = time.perf_counter()
            out = asyncio.run(_scenario(server.url, prompt, args.backlog, args.tokens))
            wall = time.perf_counter() - started
        except Exception:
            print(server.log()[-4000:])
            raise
        finally:
            server.stop()
    turns = out.b_ttft_s / out.turn_s
    met = "yes" if turns <= TARGET_TURNS else "no"
    print(f"model {model_dir.name}, MAX_BATCH_SIZE={BATCH_SIZE}, {args.backlog} A requests then 1 B")
    print(f"  max_new_tokens {args.tokens}; scenario {wall:.1f} s")
    print(f"  A requests waiting when B was sent: {out.a_waiting}")
    print(f"  A requests finished before B's first token: {out.a_done_before_b} (FIFO: {args.backlog - 4})")
    print(f"  batch turn (median end-to-end of the first {BATCH_SIZE} A): {out.turn_s * 1000:.0f} ms")
    print(f"  B's time to first token: {out.b_ttft_s * 1000:.0f} ms")
    print(f"  {'figure':<34}{'value':>8}{'target':>9}{'met':>6}")
    print(f"  {'B TTFT in batch turns':<34}{turns:>8.2f}{'<= 2':>9}{met:>6}   (FIFO: ~11)")


if __name__ == "__main__":
    main()
