"""Where a decode step's time goes: linear layers, LoRA, attention and the rest, with the native CPU
kernels and with the torch paths, side by side in one run.

SmolLM2-135M (bfloat16 where DTYPE=auto picks it), batches of decode rows over 8 adapters of mixed ranks
(`bench_engine.RANKS`) or none, each sequence `--context` tokens in. Each category's time is measured by
wrapping its entry point (`LinearWeight.__call__` including the LM head, the LoRA batch's `apply`,
`PagedAttention.forward` including the KV write, the sampler, the step's planning); "other" is the step's
wall time less those: norms, rotary, SiLU, embedding, residuals and Python. The two runners are timed
in interleaved rounds, each figure the best round, so drift on a shared host hits both alike.

    .venv/bin/python -m tests.bench.bench_step_split [--batches 1,64] [--context 256] [--steps 16]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from launch.dtype import auto_dtype
from launch.model_source import DEFAULT_CACHE_DIR, prepare_default_model
from tests.adapter_factory import save_random_adapter
from tests.bench.bench_engine import BLOCK_SIZE, RANKS, build
from worker.layers.attention import PagedAttention
from worker.layers.linear_weight import LinearWeight
from worker.lora.batch import LoraBatch, SplitLoraBatch
from worker.runner import ModelRunner, PrefillRequest
from worker.sampler import Sampler
from worker.step_plan import StepPlanner

ROUNDS = 3
CATEGORIES = ("linears", "lora", "attention", "sampling", "planning", "other")


class Timers:
    """Wall time per category while `timing()` is on; nested calls count once (the outermost)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[category] += time.perf_counter() - start
                self._depth -= 1

        return timed

    @contextlib.contextmanager
    def patched(self):
        originals = {
            (LinearWeight, "__call__"): "linears",
            (LoraBatch, "apply"): "lora",
            (SplitLoraBatch, "apply"): "lora",
            (PagedAttention, "forward"): "attention",
            (Sampler, "__call__"): "sampling",
            (StepPlanner, "plan"): "planning",
        }
        saved = {key: getattr(*key) for key in originals}
        try:
            for (cls, name), category in originals.items():
                setattr(cls, name, self.wrap(category, saved[(cls, name)]))
            yield
        finally:
            for (cls, name), fn in saved.items():
                setattr(cls, name, fn)


def start_batch(runner: ModelRunner, slots: list[int], context: int, blocks_per_seq: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    reqs = [
        PrefillRequest(
            i,
            torch.randint(3, runner.hf_config.vocab_size, (context,), generator=gen).tolist(),
            list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
            lora_slot=s,
            adapter_generation=s,
        )
        for i, s in enumerate(slots)
    ]
    for i in range(0, len(reqs), 8):  # prompts in groups: a long prefill of 64 at once needs memory
        runner.prefill(reqs[i : i + 8])
    return [r.request_id for r in reqs]


def split(runners: dict[str, ModelRunner], slots: list[int], context: int, steps: int) -> dict[str, dict]:
    """Per runner: ms per decode step, and each category's ms per step (best of ROUNDS rounds)."""
    blocks_per_seq = -(-(context + ROUNDS * steps + 2) // BLOCK_SIZE)
    ids = {name: start_batch(r, slots, context, blocks_per_seq) for name, r in runners.items()}
    for name, r in runners.items():
        r.decode(ids[name])  # warm-up
    best: dict[str, dict] = {}
    for _ in range(ROUNDS):
        for name, r in runners.items():
            timers = Timers()
            with timers.patched():
                start = time.perf_counter()
                for _ in range(steps):
                    r.decode(ids[name])
                total = time.perf_counter() - start
            figures = {c: 1e3 * timers.seconds[c] / steps for c in CATEGORIES[:-1]}
            figures["other"] = 1e3 * total / steps - sum(figures.values())
            figures["step"] = 1e3 * total / steps
            if name not in best or figures["step"] < best[name]["step"]:
                best[name] = figures
    for name, r in runners.items():
        r.release(ids[name])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=256, help="tokens in each sequence's cache")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--adapters", choices=["mixed", "none"], default="mixed")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = auto_dtype("cpu").dtype if args.dtype == "auto" else args.dtype
    model_dir = prepare_default_model(Path(DEFAULT_CACHE_DIR).expanduser())
    num_blocks = max(batches) * -(-(args.context + ROUNDS * args.steps + 2) // BLOCK_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = [
            save_random_adapter(model_dir, Path(tmp) / f"a{i}", r=r, alpha=2 * r, seed=i, std=0.02)
            for i, r in enumerate(RANKS)
        ]
        runners = {
            "native": build(model_dir, dtype, adapter_dirs, num_blocks, native=True),
            "torch": build(model_dir, dtype, adapter_dirs, num_blocks, native=False),
        }
    native = runners["native"]
    kernels = f"LoRA {type(native.lora_ops).__name__}, attention {type(native.attention_kernel).__name__}"
    print(f"SmolLM2-135M {dtype}, {torch.get_num_threads()} threads, context {args.context}, {args.adapters}")
    print(f"native runner: {kernels}")
    print(f"{'batch':>5} {'path':>7} {'step ms':>8} " + " ".join(f"{c:>10}" for c in CATEGORIES))
    for batch in batches:
        slots = [1 + i % len(RANKS) for i in range(batch)] if args.adapters == "mixed" else [0] * batch
        figures = split(runners, slots, args.context, args.steps)
        for name, f in figures.items():
            shares = " ".join(f"{f[c]:>6.2f} {100 * f[c] / f['step']:>2.0f}%" for c in CATEGORIES)
            print(f"{batch:>5} {name:>7} {f['step']:>8.2f} {shares}")
        print(f"{batch:>5} {'speedup':>7} {figures['torch']['step'] / figures['native']['step']:>8.2f}x")


if __name__ == "__main__":
    main()
