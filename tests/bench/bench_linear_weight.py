"""Prepacked bfloat16 linear weights (worker/layers/linear_weight.py) against plain `F.linear`.

Times one decoder layer's four linear shapes of SmolLM2-135M (qkv, o, gate_up, down) at several row
counts, each call on a different weight of a set larger than the caches (as in a decode step), both
forms timed in alternating rounds in one process, best round each:

    .venv/bin/python -m tests.bench.bench_linear_weight [--rows 1,4,16,32,64,128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from worker.layers.linear_weight import LinearWeight

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]: qkv, o, gate_up, down
WEIGHTS_PER_SHAPE = 20  # 20 layers' worth: ~130 MB of bf16 weights, past the caches


def _time(calls) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,32,64,128")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    plain = {s: [torch.randn(*s, generator=gen).bfloat16() for _ in range(WEIGHTS_PER_SHAPE)] for s in SHAPES}
    packed = {s: [LinearWeight(w) for w in plain[s]] for s in SHAPES}
    if not packed[SHAPES[0]][0].packed:
        raise SystemExit("this torch/CPU has no oneDNN bfloat16 support: LinearWeight keeps F.linear")
    print(f"{torch.get_num_threads()} threads; per layer (4 linears), microseconds")
    print(f"{'rows':>5} {'F.linear':>9} {'packed':>9} {'speedup':>8}")
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {s: torch.randn(rows, s[1], generator=gen).bfloat16() for s in SHAPES}
        calls = {
            "plain": [lambda x=xs[s], w=w: F.linear(x, w) for s in SHAPES for w in plain[s]],
            "packed": [lambda x=xs[s], w=w: w(x) for s in SHAPES for w in packed[s]],
        }
        best = dict.fromkeys(calls, float("inf"))
        for name in calls:  # warm-up
            _time(calls[name])
        for _ in range(args.rounds):
            for name in calls:
                best[name] = min(best[name], _time(calls[name]))
        per_layer = {k: v / WEIGHTS_PER_SHAPE * 1e6 for k, v in best.items()}
        speedup = best["plain"] / best["packed"]
        print(f"{rows:>5} {per_layer['plain']:>9.1f} {per_layer['packed']:>9.1f} {speedup:>8.2f}")


if __name__ == "__main__":
    main()
