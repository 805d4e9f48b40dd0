"""The native fused small ops (worker/kernels/cpu_fused.py) against the torch ops they replace.

Part 1 times each op at SmolLM2-135M's widths (hidden 576, intermediate 1536, 9 + 3 heads of 64) for
several row counts, in bfloat16 and float32: milliseconds per call, both forms in alternating rounds in
one process, best round each. Part 2 times a whole decode step (ModelRunner.decode) at batch 1 and 64
with and without the fused ops, on SmolLM2-135M where `make model` has prepared it (else a random model
of its shapes), bfloat16:

    .venv/bin/python -m tests.bench.bench_fused_cpu [--rows 1,16,64,512] [--batches 1,64] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from worker.kernels.cpu_fused import load_native_fused
from worker.layers.norm import add_rms_norm, rms_norm
from worker.layers.rotary import RotaryEmbedding, apply_rotary
from worker.models.llama import silu_and_mul

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
EPS = 1e-5
PROMPT_LEN = 32


def _time_per_call(call, seconds: float = 0.05) -> float:
    """Seconds per call, over a loop of about `seconds`."""
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            call()
        n += 20
        elapsed = time.perf_counter() - start
        if elapsed > seconds:
            return elapsed / n


def _best(calls: dict, rounds: int) -> dict:
    best = dict.fromkeys(calls, float("inf"))
    for name in calls:  # warm-up
        _time_per_call(calls[name], 0.01)
    for _ in range(rounds):
        for name, call in calls.items():
            best[name] = min(best[name], _time_per_call(call))
    return best


def _op_calls(fused, rows: int, dtype: torch.dtype) -> dict[str, tuple]:
    """op -> (torch call, fused call) on fresh random inputs of `rows` rows."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    residual = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    x2, residual2 = x.clone(), residual.clone()  # the fused op works in place: its own copies
    weight = torch.randn(HIDDEN, generator=g).to(dtype)
    gate_up = torch.randn(rows, 2 * INTERMEDIATE, generator=g).to(dtype)
    qkv = torch.randn(rows, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    qk = qkv[:, : HEADS + KV_HEADS]
    positions = torch.randint(0, 2048, (rows,), generator=g)
    config = type("Config", (), {"rope_theta": 10000.0})()
    torch_rotary, fused_rotary = (
        RotaryEmbedding(config, HEAD_DIM, "cpu"),
        RotaryEmbedding(config, HEAD_DIM, "cpu", fused),
    )
    cos, sin = torch_rotary.cos_sin(positions, dtype)
    return {
        "add + rms_norm": (
            lambda: add_rms_norm(x, residual, weight, EPS),
            lambda: fused.add_rms_norm(x2, residual2, weight, EPS),
        ),
        "rms_norm": (lambda: rms_norm(x, weight, EPS), lambda: fused.rms_norm(x, weight, EPS)),
        "silu * up": (lambda: silu_and_mul(gate_up), lambda: fused.silu_mul(gate_up)),
        "rotary q, k": (lambda: apply_rotary(qk, cos, sin), lambda: fused.rotary(qk, cos, sin)),
        "cos, sin": (
            lambda: torch_rotary.cos_sin(positions, dtype),
            lambda: fused_rotary.cos_sin(positions, dtype),
        ),
    }


def bench_ops(fused, rows_list: list[int], rounds: int) -> None:
    print(f"{torch.get_num_threads()} threads; ms per call (torch ops -> fused op)")
    for dtype in (torch.bfloat16, torch.float32):
        print(f"\n{str(dtype).removeprefix('torch.')}")
        print(f"{'op':<15}" + "".join(f"{'rows ' + str(r):>24}" for r in rows_list))
        table: dict[str, list[str]] = {}
        for rows in rows_list:
            for op, (torch_call, fused_call) in _op_calls(fused, rows, dtype).items():
                best = _best({"torch": torch_call, "fused": fused_call}, rounds)
                t, f = best["torch"] * 1e3, best["fused"] * 1e3
                cell = f"{t:.4f} -> {f:.4f} x{t / f:.1f}"
                table.setdefault(op, []).append(cell)
        for op, cells in table.items():
            print(f"{op:<15}" + "".join(f"{c:>24}" for c in cells))


def _model_dir(given: Path | None, tmp: Path) -> tuple[Path, str]:
    """The model to step: `given`, the prepared SmolLM2-135M, or a random model of its shapes."""
    from launch.model_source import DEFAULT_CACHE_DIR, DEFAULT_MODEL_DIRNAME

    if given:
        return given, str(given)
    prepared = Path(DEFAULT_CACHE_DIR).expanduser() / "models" / DEFAULT_MODEL_DIRNAME
    if (prepared / "model.safetensors").is_file():
        return prepared, f"SmolLM2-135M ({prepared})"
    from tests.adapter_factory import save_random_model, tiny_llama_config

    config = tiny_llama_config(
        vocab_size=49152,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=30,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return save_random_model(config, tmp / "smollm2-shapes", dtype=torch.bfloat16), "random, SmolLM2's shapes"


def _runner(model_dir: Path, batch: int, steps: int, fused: bool):
    from worker.config import WorkerConfig
    from worker.runner import ModelRunner, PrefillRequest

    blocks_per_seq = -(-(PROMPT_LEN + steps + 1) // 16)
    config = WorkerConfig(model_dir=model_dir, dtype="bfloat16", num_blocks=batch * blocks_per_seq + 1)
    # Without: the runner's selection answers None, as where the ops cannot be built.
    off = mock.patch("worker.runner.select_fused_ops", return_value=None)
    with contextlib.nullcontext() if fused else off:
        runner = ModelRunner(config)
    assert (runner.fused_ops is not None) == fused
    for i in range(batch):
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        runner.prefill([PrefillRequest(i, [(17 * i + 5 * t) % 1000 + 10 for t in range(PROMPT_LEN)], table)])
    return runner


def bench_model(model_dir: Path, batches: list[int], rounds: int, steps: int) -> None:
    print("\nwhole decode step (ModelRunner.decode), bfloat16, ms per step: torch ops -> fused ops")
    for batch in batches:
        runners = {f: _runner(model_dir, batch, rounds * steps + 2, f) for f in (False, True)}
        ids = list(range(batch))
        best = dict.fromkeys(runners, float("inf"))
        for runner in runners.values():
            runner.decode(ids)  # warm-up
        for _ in range(rounds):
            for fused, runner in runners.items():
                start = time.perf_counter()
                for _ in range(steps):
                    runner.decode(ids)
                best[fused] = min(best[fused], (time.perf_counter() - start) / steps)
        saved = (best[False] - best[True]) * 1e3
        print(
            f"batch {batch:>3}: {best[False] * 1e3:8.2f} -> {best[True] * 1e3:8.2f} ms "
            f"({saved:.2f} ms saved, x{best[False] / best[True]:.3f})"
        )
        del runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64,512")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="decode steps per round")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fused = load_native_fused()
    if fused is None:
        raise SystemExit("the native fused ops cannot be built here (see the log)")
    bench_ops(fused, [int(r) for r in args.rows.split(",")], args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, what = _model_dir(args.model_dir, Path(tmp))
        print(f"\nmodel: {what}")
        bench_model(model_dir, [int(b) for b in args.batches.split(",")], args.rounds, args.steps)


if __name__ == "__main__":
    main()
