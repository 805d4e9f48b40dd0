"""Chunked prefill: a long prompt joining a decoding batch, chunked and whole, figures side by side.

Servers of the suite's model (SmolLM2-135M, max_position_embeddings 8192): one per
MAX_BATCH_PREFILL_TOKENS in --chunks (the long prompt comes in chunks) and one whose budget takes it
whole. On each: `--running` streams decode alone (their inter-token latency, ITL, p50: the baseline);
then the same streams again, and once each has a few tokens an `--prompt-tokens` prompt joins (their ITL
p99 over the gaps that overlap its prefill, and its TTFT); then that prompt alone on the idle server
(TTFT of a prefill alone). Targets (issue 16): chunked, ITL p99 during the join <= 2x the baseline p50,
and the long prompt's TTFT <= 1.3x a prefill alone (on the server that takes it whole). A chunk should
cost about a decode step: the right --chunks depends on the hardware.

    .venv/bin/python -m tests.bench.bench_chunked_prefill [--prompt-tokens 8000] [--running 16] \
        [--chunks 512,128]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

from tests.bench import loadgen
from tests.bench.suite import _model_dir, _prompts
from tests.bench.workload import Request, render_chat
from tests.e2e.harness import Server

log = logging.getLogger(__name__)

JOIN_AFTER_TOKENS = 8  # the long prompt joins once every running stream has this many tokens


def long_prompt(model_dir: Path, num_tokens: int) -> str:
    """About `num_tokens` tokens of the suite's prompts, repeated."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text, ids = "", []
    while len(ids) < num_tokens:
        text += " ".join(_prompts()) + "\n"
        ids = tokenizer.encode(text).ids
    return tokenizer.decode(ids[:num_tokens])


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def _batch(url: str, running: list[Request], long: Request | None) -> dict:
    """The running streams, and `long` joining once they all decode; their gaps and its TTFT."""
    records = [loadgen.Record(r) for r in running]
    async with aiohttp.ClientSession(timeout=loadgen.TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(loadgen._one(s, url, rec)) for rec in records]
        joined = None
        if long is not None:
            # (A stream that ended early, at EOS, is not waited for.)
            while any(
                len(r.token_times) < JOIN_AFTER_TOKENS and not t.done()
                for r, t in zip(records, tasks, strict=True)
            ):
                await asyncio.sleep(0.005)
            joined = loadgen.Record(long)
            await loadgen._one(s, url, joined)
        await asyncio.gather(*tasks)
    assert all(r.ok for r in records) and (joined is None or joined.ok), "a request failed"
    gaps = [g for r in records for g in r.gaps]
    if joined is None:
        made = statistics.mean(len(r.token_times) for r in records)
        return {"itl_p50": p(gaps, 50), "itl_p99": p(gaps, 99), "tokens_per_stream": made}
    start, end = joined.sent, joined.token_times[0]
    # The gaps that overlap its prefill: the steps its chunks (or its whole prompt) share.
    during = [
        b - a
        for r in records
        for a, b in zip(r.token_times, r.token_times[1:], strict=False)
        if a < end and b > start
    ]
    return {"itl_p99_join": p(during or gaps, 99), "ttft": joined.ttft, "gaps_during": len(during)}


def measure(model_dir: Path, budget: int, args, prompt: str) -> dict:
    # Chat-rendered, so that the instruct model answers at length rather than stopping at once.
    chats = render_chat(model_dir, _prompts())
    running = [Request(i, chats[i % len(chats)], args.new_tokens) for i in range(args.running)]
    long = Request(-1, prompt, 4)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MAX_BATCH_PREFILL_TOKENS": str(budget), "KV_CACHE_MEMORY": args.kv_cache_memory}
        server = Server(Path(tmp) / "launcher.log", env=env)
        try:
            server.wait_ready(timeout=600)
            log.info("budget %d: server ready; warming up", budget)
            loadgen.run_concurrency(server.url, [Request(0, "Hello", 2), long], 1)  # warm up both shapes
            out = asyncio.run(_batch(server.url, running, None))
            log.info("budget %d: baseline done; now with the long prompt joining", budget)
            out |= asyncio.run(_batch(server.url, running, long))
            log.info("budget %d: join done; now the long prompt alone", budget)
            alone = loadgen.run_concurrency(server.url, [long] * 2, 1).records
            out["ttft_alone"] = min(r.ttft for r in alone)
            return out
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--running", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens each running stream makes")
    parser.add_argument("--chunks", default="512", help="MAX_BATCH_PREFILL_TOKENS values when chunked")
    parser.add_argument("--kv-cache-memory", default="2GiB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model_dir = _model_dir(None)
    prompt = long_prompt(model_dir, args.prompt_tokens)
    whole = measure(model_dir, args.prompt_tokens + 64, args, prompt)
    chunked = {int(c): measure(model_dir, int(c), args, prompt) for c in args.chunks.split(",")}
    columns = {f"chunked {c}": out for c, out in chunked.items()} | {"whole": whole}
    print(f"{args.prompt_tokens}-token prompt joining {args.running} streams ({model_dir.name})")
    print(f"{'':34}" + "".join(f"{name:>14}" for name in columns))
    rows = [
        ("running ITL p50, alone (ms)", "itl_p50", 1000),
        ("running ITL p99, alone (ms)", "itl_p99", 1000),
        ("running ITL p99, during join (ms)", "itl_p99_join", 1000),
        ("  gaps measured during join", "gaps_during", 1),
        ("  tokens per running stream", "tokens_per_stream", 1),
        ("long prompt TTFT, joining (ms)", "ttft", 1000),
        ("long prompt TTFT, alone (ms)", "ttft_alone", 1000),
    ]
    for label, key, scale in rows:
        print(f"{label:34}" + "".join(f"{out[key] * scale:>14.1f}" for out in columns.values()))
    for c, out in chunked.items():
        itl_ratio = out["itl_p99_join"] / out["itl_p50"]
        ttft_ratio = out["ttft"] / whole["ttft_alone"]
        print(f"chunked {c}: ITL p99 during join / p50 alone = {itl_ratio:.2f} (target <= 2); ", end="")
        print(f"TTFT joining / a whole prefill alone = {ttft_ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
