"""Decode throughput of the engine with no adapter, one adapter, and 8 distinct adapters of mixed ranks.

Prints decode tokens/s at batch 1, 8 and 32 on SmolLM2-135M (bfloat16 by default) and the ratios
against base-only, all measured in one run, in interleaved rounds (see decode_tps):

    .venv/bin/python -m tests.bench.bench_engine [--steps 32] [--dtype auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from launch.dtype import auto_dtype
from launch.model_source import DEFAULT_CACHE_DIR, prepare_default_model
from tests.adapter_factory import save_random_adapter
from worker.config import WorkerConfig
from worker.lora.adapter import load_peft_adapter
from worker.runner import ModelRunner, PrefillRequest

RANKS = [8, 16, 32, 8, 16, 32, 8, 16]
PROMPT_LEN = 32
BLOCK_SIZE = 16
ROUNDS = 3


def build(
    model_dir: Path, dtype: str, adapter_dirs: list[Path], num_blocks: int, native: bool = True
) -> ModelRunner:
    """A runner with `adapter_dirs` in slots 1, 2, ...; `native`: NATIVE_CPU_KERNELS."""
    config = WorkerConfig(
        model_dir=model_dir,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        max_adapters=len(adapter_dirs),
        max_lora_rank=max(RANKS),
        native_cpu_kernels=native,
    )
    runner = ModelRunner(config)
    for slot, path in enumerate(adapter_dirs, start=1):
        layers = runner.hf_config.num_hidden_layers
        adapter = load_peft_adapter(f"a{slot}", path, layers, runner.module_shapes())
        runner.load_adapter(slot, adapter, generation=slot)  # one load per slot: its number will do
    return runner


def _prefill(runner: ModelRunner, slots: list[int], first_id: int, first_block: int, blocks_per_seq: int):
    """Prefill one batch whose row i uses adapter slot slots[i]; returns its request ids."""
    gen = torch.Generator().manual_seed(0)
    reqs = [
        PrefillRequest(
            first_id + i,
            torch.randint(3, runner.hf_config.vocab_size, (PROMPT_LEN,), generator=gen).tolist(),
            list(range(first_block + i * blocks_per_seq, first_block + (i + 1) * blocks_per_seq)),
            lora_slot=s,
            adapter_generation=s,
        )
        for i, s in enumerate(slots)
    ]
    runner.prefill(reqs)
    return [r.request_id for r in reqs]


def decode_tps(runner: ModelRunner, batches: dict[str, list[int]], steps: int, warmup: int = 3) -> dict:
    """Decode tokens/s of each named batch (row i of a batch uses adapter slot slots[i]).

    The batches are all resident at once and timed in interleaved rounds (a, b, c, a, b, c, ...), each
    batch's figure the best of its rounds: drift on a shared machine then hits every batch alike, and
    the ratios compare like with like.
    """
    blocks_per_seq = blocks_per_sequence(steps, warmup)
    ids, first = {}, 0
    for name, slots in batches.items():
        ids[name] = _prefill(runner, slots, first, first * blocks_per_seq, blocks_per_seq)
        first += len(slots)
    for name in batches:
        for _ in range(warmup):
            runner.decode(ids[name])
    best = dict.fromkeys(batches, float("inf"))
    for _ in range(ROUNDS):
        for name in batches:
            start = time.perf_counter()
            for _ in range(steps):
                runner.decode(ids[name])
            best[name] = min(best[name], time.perf_counter() - start)
    for name in batches:
        runner.release(ids[name])
    return {name: len(batches[name]) * steps / best[name] for name in batches}


def blocks_per_sequence(steps: int, warmup: int = 3) -> int:
    return (PROMPT_LEN + ROUNDS * steps + warmup + BLOCK_SIZE) // BLOCK_SIZE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="auto: what the server's DTYPE=auto picks here")
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = auto_dtype("cpu").dtype if args.dtype == "auto" else args.dtype
    model_dir = prepare_default_model(Path(DEFAULT_CACHE_DIR).expanduser())
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = [
            save_random_adapter(model_dir, Path(tmp) / f"a{i}", r=r, alpha=2 * r, seed=i, std=0.02)
            for i, r in enumerate(RANKS)
        ]
        # Three batches (base, one adapter, mixed) of the largest size are resident at once.
        num_blocks = 3 * max(batches) * blocks_per_sequence(args.steps)
        runner = build(model_dir, dtype, adapter_dirs, num_blocks)
    print(f"SmolLM2-135M {dtype}, {torch.get_num_threads()} threads, prompt {PROMPT_LEN}, {args.steps} steps")
    print(
        f"{'batch':>5} {'base tok/s':>11} {'1 adapter':>10} {'8 mixed':>9} {'1/base':>7} {'mixed/base':>10}"
    )
    for batch in batches:
        tps = decode_tps(
            runner,
            {"base": [0] * batch, "one": [1] * batch, "mixed": [1 + i % len(RANKS) for i in range(batch)]},
            args.steps,
        )
        base, one, mixed = tps["base"], tps["one"], tps["mixed"]
        print(f"{batch:>5} {base:>11.1f} {one:>10.1f} {mixed:>9.1f} {one / base:>7.2f} {mixed / base:>10.2f}")


if __name__ == "__main__":
    main()
