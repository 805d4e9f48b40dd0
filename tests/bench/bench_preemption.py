"""Issue 16's KV figure: how many requests run at once, and the throughput, with blocks on demand
(this tree) against blocks reserved at admission (this tree with the old router policy), side by side.

    .venv/bin/python -m tests.bench.bench_preemption [--requests 128] [--before PATH]

The e2e tests' tiny random Llama in float32 on CPU, MAX_TOTAL_TOKENS=256 and a KV cache of exactly 8
worst-case requests (8 x 256 tokens). Every request is a stream without max_new_tokens (so its worst
case is the whole context) that the client stops after 16-48 tokens, the way a client stops at its own
stop condition. Reserving prompt + max_new_tokens at admission runs 8 at once; on demand, a request
holds only what it has computed, so many more run, and the newest are preempted when the cache fills.
Figures: the running batch (`tgi_batch_current_size`, sampled every 50 ms: peak and mean), tokens per
second over the whole run, the worker's mean decode forward, and preemptions. The old policy runs from a
copy of this tree whose `POLICY_FILES` are those of `RESERVING_COMMIT` (`--before` names another
tree). A run takes a minute or two; on a busy machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import aiohttp

from tests.adapter_factory import tiny_chat_model
from tests.bench.suite import _model_dir
from tests.e2e import harness

MAX_TOTAL = 256
BLOCK_SIZE = 16
# The tiny model's KV block: K and V x 3 layers x 16 tokens x 4 KV heads x head dim 8 x 4 bytes.
BLOCK_BYTES = 2 * 3 * BLOCK_SIZE * 4 * 8 * 4
WORST_CASE_REQUESTS = 8
PROMPT = "Tell me about the sea and the ships on it"
TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Outcome:
    peak_running: int
    mean_running: float
    tokens: int
    wall_s: float
    preemptions: int
    decode_forward_ms: float  # the worker's mean Decode forward (rank 0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def _metric(session: aiohttp.ClientSession, url: str, name: str, labels: str = "") -> float:
    """The sum of `name`'s samples (whose labels contain `labels`)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    found = re.findall(rf"^{name}(?:{{[^}}]*{re.escape(labels)}[^}}]*}})? (\S+)$", text, re.M)
    return sum(float(v) for v in found)


async def _decode_forward(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(seconds, count) of the Decode forwards so far."""
    name, label = "tgi_batch_forward_duration", 'method="decode"'
    seconds = await _metric(session, url, f"{name}_sum", label)
    return seconds, await _metric(session, url, f"{name}_count", label)


async def _stream(session: aiohttp.ClientSession, url: str, stop_after: int) -> int:
    """One stream, stopped (disconnected) after `stop_after` tokens; the tokens it got."""
    body = {"inputs": PROMPT, "parameters": {}}
    got = 0
    async with session.post(url + "/generate_stream", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data:"):
                got += 1
                if got >= stop_after:
                    break
    return got


async def _scenario(url: str, num_requests: int) -> Outcome:
    lengths = [16 + (7 * i) % 33 for i in range(num_requests)]  # 16..48, spread evenly
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _stream(session, url, 4)  # warm-up
        before = await _metric(session, url, "multilora_preemptions")
        forward_before = await _decode_forward(session, url)
        samples: list[int] = []
        started = time.perf_counter()
        streams = asyncio.gather(*(_stream(session, url, n) for n in lengths))
        task = asyncio.ensure_future(streams)
        while not task.done():
            samples.append(await _metric(session, url, "tgi_batch_current_size"))
            await asyncio.sleep(0.05)
        got = await task
        wall = time.perf_counter() - started
        preemptions = int(await _metric(session, url, "multilora_preemptions") - before)
        forward_s, steps = await _decode_forward(session, url)
        forward_s, steps = forward_s - forward_before[0], steps - forward_before[1]
    busy = [int(s) for s in samples if s] or [0]
    forward_ms = 1000 * forward_s / max(steps, 1)
    return Outcome(max(busy), statistics.mean(busy), sum(got), wall, preemptions, forward_ms)


def _run(root: Path, model_dir: Path, work: Path, label: str, num_requests: int) -> Outcome:
    env = {
        "MODEL_ID": str(model_dir),
        "DTYPE": "float32",
        "DEVICE": "cpu",
        "MAX_TOTAL_TOKENS": str(MAX_TOTAL),
        "BLOCK_SIZE": str(BLOCK_SIZE),
        "KV_CACHE_MEMORY": str(WORST_CASE_REQUESTS * (MAX_TOTAL // BLOCK_SIZE) * BLOCK_BYTES),
        "MAX_CONCURRENT_REQUESTS": str(4 * num_requests),
    }
    with mock.patch.object(harness, "ROOT", root):  # the launcher of that tree
        server = harness.Server(work / f"{label}.log", env=env)
    try:
        server.wait_ready(timeout=600)
        return asyncio.run(_scenario(server.url, num_requests))
    except Exception:
        print(server.log()[-4000:])
        raise
    finally:
        server.stop()


POLICY_FILES = ("router/queue.py", "router/scheduler.py", "router/block_manager.py", "router/sequence.py")
RESERVING_COMMIT = "0a66146"  # the last commit whose router reserved prompt + max_new_tokens at admission


def _reserving_tree(dest: Path) -> Path:
    """This tree (its worker and everything else as they are) with the old admission policy: the router's
    policy files of RESERVING_COMMIT (read with `git show`; the working tree is not touched)."""
    shutil.copytree(
        harness.ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".make", "*.log")
    )
    for path in POLICY_FILES:
        show = ["git", "show", f"{RESERVING_COMMIT}:{path}"]
        old = subprocess.run(show, cwd=harness.ROOT, check=True, capture_output=True)
        (dest / path).write_bytes(old.stdout)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--before", type=Path, help="a tree with the old policy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as tmp:
        work = Path(tmp)
        model_dir = tiny_chat_model(_model_dir(None), work / "model")
        old_root = args.before or _reserving_tree(work / "reserving")
        old = _run(old_root, model_dir, work, "reserved", args.requests)
        new = _run(harness.ROOT, model_dir, work, "on-demand", args.requests)
    ratio = new.mean_running / max(old.mean_running, 1e-9)
    print(
        f"tiny Llama float32 CPU, KV cache = {WORST_CASE_REQUESTS} x {MAX_TOTAL} tokens, "
        f"{args.requests} streams without max_new_tokens, each stopped after 16-48 tokens"
    )
    print(f"  {'':<28}{'reserved':>16}{'on demand':>12}{'ratio':>8}")
    rows = [
        ("running, peak", old.peak_running, new.peak_running, "d"),
        ("running, mean while busy", old.mean_running, new.mean_running, ".1f"),
        ("tokens / s", old.tokens_per_s, new.tokens_per_s, ".0f"),
        ("wall time (s)", old.wall_s, new.wall_s, ".1f"),
        ("decode forward (ms)", old.decode_forward_ms, new.decode_forward_ms, ".1f"),
        ("tokens streamed", old.tokens, new.tokens, "d"),
        ("preemptions", old.preemptions, new.preemptions, "d"),
    ]
    for name, a, b, fmt in rows:
        shown = f"{b / a:>8.2f}" if a and name not in ("tokens streamed", "preemptions") else ""
        print(f"  {name:<28}{a:>16{fmt}}{b:>12{fmt}}{shown}")
    met = "yes" if ratio >= TARGET_RATIO else "no"
    print(f"  target: >= {TARGET_RATIO:.0f}x as many running (mean): {ratio:.2f}x, met: {met}")


if __name__ == "__main__":
    main()
