"""Milliseconds per model step of the CPU LoRA ops: the adapter pool (TorchLoraOps.lora_site) against
the stacked buffers it replaced (the old TorchLoraOps.sgmv_lora over fused stacks) and the native kernel
(NativeCpuLoraOps.lora_site, `csrc/lora_cpu.cpp`, its pool in the model dtype) beside it.

SmolLM2-135M-like shapes: h 576, q 576, k/v 192, o 576, gate/up 1536, down 1536 -> 576; 30 layers x
4 sites (qkv, o, gate_up, down), every adapter targeting all 7 modules; bf16 model dtype, fp32 LoRA
weights. A step is the 120 site calls of one forward; the batch's adapters stay the same across steps
(the copy caches are warm, as in steady decode), laid out by rank as `TorchLoraOps.row_order` does.
Cases run by default: decode 64 rows over 8 adapters of rank 8, decode 32 rows over 32 adapters of
ranks 4-64, a 512-token prefill of one rank-8 adapter; with --case also decode1x1 and decode4x2 (the
fixed cost per site). The paths' outputs are compared once before timing.

The old path needs the pre-pool ops, importable as `oldops.torch_ops` from --old (a directory):
    mkdir -p /tmp/oldops/oldops && touch /tmp/oldops/oldops/__init__.py
    git show 1b1ae86:worker/kernels/torch_grouped.py > /tmp/oldops/oldops/torch_grouped.py
    git show 1b1ae86:worker/kernels/torch_ops.py \
        | sed 's/worker.kernels.torch_grouped/oldops.torch_grouped/' > /tmp/oldops/oldops/torch_ops.py
Run: .venv/bin/python tests/bench/bench_lora_cpu_pool.py [--old /tmp/oldops] [--case NAME]... [--cpu-time]
     [--threads N] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from worker.kernels.cpu_native import NativeCpuLoraOps, load_native
from worker.kernels.pool_args import PoolPart, StepRows
from worker.kernels.torch_ops import TorchLoraOps
from worker.lora.pages import page_elems_for
from worker.lora.pool import AdapterPool, ModuleFactors, StepTables

H = 576
LAYERS = 30
OUT = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536, "up_proj": 1536}
OUT["down_proj"] = 576
SITES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# case -> (rows per adapter, the adapters' ranks)
CASES = {
    "decode64x8": ([8] * 8, [8] * 8),
    "decode32x32": ([1] * 32, [(4, 8, 16, 32, 64)[i % 5] for i in range(32)]),
    "prefill512": ([512], [8]),
    "decode1x1": ([1], [16]),  # one user: the ops' fixed cost per site
    "decode4x2": ([2, 2], [8, 16]),
}


def h_in(site) -> int:
    return 1536 if site == ("down_proj",) else H


def make_adapters(ranks: list[int], g: torch.Generator) -> list[dict]:
    """Per adapter: (layer, module) -> ModuleFactors(a [r, h_in], b_t [r, h_out]) float32."""
    return [
        {
            (layer, m): ModuleFactors(
                torch.randn(r, h_in(site), generator=g) * h_in(site) ** -0.5,
                torch.randn(r, OUT[m], generator=g) * 0.1,
            )
            for layer in range(LAYERS)
            for site in SITES
            for m in site
        }
        for r in ranks
    ]


def pool_step(adapters, lengths, ops=None):
    """The pool path's step with `ops` (TorchLoraOps by default): a closure making the 120 lora_site
    calls, and its outputs."""
    ops, widths = ops or TorchLoraOps(), (H, 192, 1536)
    page = page_elems_for(widths)
    need = sum(f.a.numel() + f.b_t.numel() for ad in adapters for f in ad.values())
    dtype = ops.pool_dtype(torch.bfloat16)
    pool = AdapterPool(need // page + 8 * len(adapters) + 64, page, widths, dtype, "cpu")
    placed = [pool.place(ad) for ad in adapters]
    keys = [(layer, m) for layer in range(LAYERS) for site in SITES for m in site]
    tables = StepTables.build(placed, keys, torch.device("cpu"))
    row_adapter = [g for g, n in enumerate(lengths) for _ in range(n)]
    rows = StepRows.build(row_adapter, tuple(p.handle for p in placed), True, torch.device("cpu"))
    host = tables.host_lora_ranks.tolist()
    calls, outs = [], []
    for layer in range(LAYERS):
        for site in SITES:
            parts, col = [], 0
            for m in site:
                a, b, r = tables.for_key((layer, m))
                k = tables.index[(layer, m)]
                parts.append(PoolPart((layer, m), pool.view(OUT[m]), a, b, r, tuple(host[k]), col))
                col += OUT[m]
            out = torch.zeros(len(row_adapter), col, dtype=torch.bfloat16)
            calls.append((pool.view(h_in(site)), tuple(parts), out, site))
            outs.append(out)
    xs = {
        w: torch.randn(len(row_adapter), w, generator=torch.Generator().manual_seed(w)).bfloat16()
        for w in (H, 1536)
    }

    def step():
        for a_view, parts, out, site in calls:
            ops.lora_site(xs[h_in(site)], a_view, parts, rows, out)

    return step, outs, ops


def stacked_step(old_ops_cls, adapters, lengths):
    """The old path's step over fused stacks (slot 0 empty, slot g + 1 = adapter g, rows sorted)."""
    ops, max_rank = old_ops_cls(), max(ad[(0, "q_proj")].a.shape[0] for ad in adapters)
    slots = len(adapters) + 1
    seg_slots = torch.tensor([g + 1 for g in range(len(lengths))], dtype=torch.int32)
    indptr = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
    n = int(indptr[-1])
    calls, outs = [], []
    for layer in range(LAYERS):
        for site in SITES:
            width = sum(OUT[m] for m in site)
            a_st = torch.zeros(slots, len(site) * max_rank, h_in(site))
            b_st = torch.zeros(slots, len(site) * max_rank, width)
            ranks = [0] * slots
            for g, ad in enumerate(adapters):
                row, col = 0, 0
                for m in site:
                    f = ad[(layer, m)]
                    r = f.a.shape[0]
                    a_st[g + 1, row : row + r] = f.a
                    b_st[g + 1, row : row + r, col : col + OUT[m]] = f.b_t
                    row, col = row + r, col + OUT[m]
                ranks[g + 1] = row
            out = torch.zeros(n, width, dtype=torch.bfloat16)
            y = torch.empty(n, len(site) * max_rank)
            calls.append((a_st, b_st, torch.tensor(ranks, dtype=torch.int32), y, out, site))
            outs.append(out)
    xs = {w: torch.randn(n, w, generator=torch.Generator().manual_seed(w)).bfloat16() for w in (H, 1536)}

    def step():
        for a_st, b_st, ranks, y, out, site in calls:
            ops.sgmv_lora(xs[h_in(site)], a_st, b_st, indptr, seg_slots, ranks, y, out, 0)

    return step, outs


def ms_per_step(steps, repeat: int, timer) -> list[float]:
    """Per step function, the best of `repeat` rounds of its mean ms per step, each round lasting about
    0.3 s; the functions' rounds alternate, so a load that comes and goes affects them alike."""
    numbers = []
    for step in steps:
        step()
        t0 = timer()
        step()
        numbers.append(max(1, int(0.3 / max(timer() - t0, 1e-6))))
    best = [float("inf")] * len(steps)
    for _ in range(repeat):
        for i, (step, number) in enumerate(zip(steps, numbers, strict=True)):
            t0 = timer()
            for _ in range(number):
                step()
            best[i] = min(best[i], (timer() - t0) / number * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=None, help="directory holding the package oldops (see above)")
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time on 1 thread: steadier than wall time on a loaded machine",
    )
    args = parser.parse_args()
    timer = time.process_time if args.cpu_time else time.perf_counter
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    old_cls = None
    if args.old:
        sys.path.insert(0, args.old)
        from oldops.torch_ops import TorchLoraOps as old_cls  # noqa: N813
    clock = "CPU time" if args.cpu_time else "wall time"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; ms per step of {LAYERS} x 4 sites ({clock})")
    native = load_native()
    print(
        f"{'case':<14}{'stacked':>10}{'pool':>10}{'pool/stacked':>14}{'pool cache MiB':>16}"
        f"{'native':>10}{'native/pool':>13}"
    )
    for name in args.case or list(CASES)[:3]:
        lengths, ranks = CASES[name]
        # The runner lays rows out by TorchLoraOps.row_order: adapters of one rank are neighbours.
        order = sorted(range(len(ranks)), key=ranks.__getitem__)
        lengths, ranks = [lengths[i] for i in order], [ranks[i] for i in order]
        adapters = make_adapters(ranks, torch.Generator().manual_seed(0))
        step, outs, ops = pool_step(adapters, lengths)
        step()
        steps = [step]
        if native is not None:
            native_step, native_outs, _ = pool_step(adapters, lengths, NativeCpuLoraOps(native))
            native_step()
            err = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(outs, native_outs, strict=True)
            )
            assert err < 0.1, f"{name}: the native kernel and the torch path disagree by {err}"
            steps.append(native_step)
        if old_cls is not None:
            old_step, old_outs = stacked_step(old_cls, adapters, lengths)
            old_step()
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, old_outs, strict=True))
            assert err < 0.1, f"{name}: the paths disagree by {err}"
            steps.append(old_step)
        times = ms_per_step(steps, args.repeat, timer)
        pool_ms, native_ms = times[0], times[1] if native is not None else float("nan")
        old_ms = times[-1] if old_cls is not None else float("nan")
        cache_mib = ops.cache.nbytes / 2**20
        print(
            f"{name:<14}{old_ms:>10.2f}{pool_ms:>10.2f}{pool_ms / old_ms:>14.2f}{cache_mib:>16.0f}"
            f"{native_ms:>10.2f}{native_ms / pool_ms:>13.2f}"
        )
        del step, steps, outs, ops, adapters
        gc.collect()


if __name__ == "__main__":
    main()
