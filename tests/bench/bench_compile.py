"""torch.compile (inductor) of the base forward against eager, with the native CPU kernels and with the
torch paths, side by side in one run: whether compiling pays, after counting its compile time.

SmolLM2-135M (bfloat16 where DTYPE=auto picks it), no adapters (the base forward), batches of decode rows,
each sequence `--context` tokens in. Each runner's model is wrapped in `torch.compile` (mode
`--mode`, optionally with inductor's freezing); the first `--warmup` decode steps are timed apart as the
compile cost (dynamo compiles on the first step and again when a shape or a guarded int changes, e.g. a
sequence's block count; after a change it marks the size dynamic). Then eager and compiled runners are
timed in interleaved rounds, each figure the best round. A compile that fails is reported, not hidden.

    .venv/bin/python -m tests.bench.bench_compile [--batches 1,64] [--context 256] [--steps 16]
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

from launch.dtype import auto_dtype
from launch.model_source import DEFAULT_CACHE_DIR, prepare_default_model
from tests.bench.bench_engine import BLOCK_SIZE, build
from tests.bench.bench_step_split import start_batch
from worker.layers import linear_weight

ROUNDS = 3


def compile_model(runner, mode: str, freezing: bool) -> None:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    # Graph breaks (native kernels, host-side planning) make each layer's forward a frame of its own,
    # guarded on that layer: 30 layers need more than dynamo's default 8 compiled versions a frame.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    runner.model = torch.compile(runner.model, mode=None if mode == "default" else mode)


def timed_steps(runner, ids: list[int], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.decode(ids)
    return (time.perf_counter() - start) / steps


def run_batch(runners: dict, batch: int, context: int, steps: int, warmup: int) -> dict[str, dict]:
    blocks_per_seq = -(-(context + warmup + ROUNDS * steps + 2) // BLOCK_SIZE)
    ids: dict[str, list[int]] = {}
    figures: dict[str, dict] = {}
    for name, r in runners.items():
        start = time.perf_counter()
        try:
            ids[name] = start_batch(r, [0] * batch, context, blocks_per_seq)
            for _ in range(warmup):
                r.decode(ids[name])
        except Exception as exc:  # a compile that fails is a finding
            traceback.print_exc()
            figures[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        # The warm-up includes the batch's prefill (compiled too: its own graphs).
        figures[name] = {"warmup_s": time.perf_counter() - start, "step_ms": float("inf")}
    for _ in range(ROUNDS):
        for name, r in runners.items():
            if "error" not in figures[name]:
                ms = 1e3 * timed_steps(r, ids[name], steps)
                figures[name]["step_ms"] = min(figures[name]["step_ms"], ms)
    for name, r in runners.items():
        r.release(ids.get(name, []))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=256, help="tokens in each sequence's cache")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=40, help="steps counted as compile cost")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--mode", default="default", help="torch.compile mode: default, max-autotune-no-cudagraphs"
    )
    parser.add_argument("--freezing", action="store_true", help="inductor's freezing pass (constant weights)")
    parser.add_argument("--paths", default="native,torch", help="which kernel paths to compare")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = auto_dtype("cpu").dtype if args.dtype == "auto" else args.dtype
    model_dir = prepare_default_model(Path(DEFAULT_CACHE_DIR).expanduser())
    steps_needed = args.warmup + ROUNDS * args.steps + 2
    num_blocks = max(batches) * -(-(args.context + steps_needed) // BLOCK_SIZE)
    runners = {}
    for path in args.paths.split(","):
        native = path == "native"
        runners[f"{path} eager"] = build(model_dir, dtype, [], num_blocks, native=native)
        # Inductor cannot lower oneDNN's packed weights (opaque tensors): the compiled runner keeps
        # plain ones, which freezing packs itself.
        with mock.patch.object(linear_weight, "_packs", lambda weight: False):
            compiled = build(model_dir, dtype, [], num_blocks, native=native)
        compile_model(compiled, args.mode, args.freezing)
        runners[f"{path} compiled"] = compiled
    print(
        f"SmolLM2-135M {dtype}, {torch.get_num_threads()} threads, context {args.context}, base forward, "
        f"torch {torch.__version__}, mode {args.mode}, freezing {args.freezing}"
    )
    print(f"{'batch':>5} {'runner':>16} {'step ms':>8} {'warm-up s':>10}  (warm-up: {args.warmup} steps)")
    for batch in batches:
        for name, f in run_batch(runners, batch, args.context, args.steps, args.warmup).items():
            if "error" in f:
                print(f"{batch:>5} {name:>16} failed: {f['error']}")
            else:
                print(f"{batch:>5} {name:>16} {f['step_ms']:>8.2f} {f['warmup_s']:>10.1f}")


if __name__ == "__main__":
    main()
