"""Benchmark of the CUDA LoRA pool kernels (worker/kernels/cuda.py) against a torch gather + bmm.

Run on a CUDA machine from the repository root: `PYTHONPATH=. python tests/bench/bench_lora_kernels.py`.
The adapters live in a real AdapterPool (worker/lora/pool.py): each holds its true-rank rows, wherever
the pool put them, and the kernels read them through the step's row tables. Prints, per shape: kernel
time, effective bandwidth (the bytes of x, the A or B rows of the adapters in use, y and out that the op
must move, divided by the time), that bandwidth as a share of the device's measured copy bandwidth, the
gather + bmm time (the rows gathered from the pool by the same tables, then one batched matmul), and
kernel / torch. Copy bandwidth counts bytes read plus bytes written of 1 GiB copies; the yardstick is
the fastest of an eager memcpy, a memcpy captured in a graph (which may run on a copy engine) and an
elementwise kernel, and all three are printed.

Ops: `shrink` and `expand` are one kernel each (CudaLoraOps._shrink / _expand on one part); `site` is a
whole `lora_site` call (a shrink and an expand per part) over Llama-3-8B's q, k, v.

Times are CUDA-graph replays of many calls (no launch gaps), each call on its own copy of the inputs
(its own pool) in turn, with enough copies to cover four times the L2 cache so the weights come from
memory. Targets (issue 5): at batch >= 64, bandwidth >= 80% of copy and time <= 0.3 x gather + bmm.

Two floors are printed first, to read the small shapes against: a graph replay of a one-element torch
kernel (the per-kernel cost of a replayed graph), and the bgmv shrink at n=64 with every rank 0 (launch,
index loads, no weights). A kernel cannot take less than the second plus its bytes at copy bandwidth.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from worker.kernels.cuda import CudaLoraOps
from worker.kernels.pool_args import PoolPart, StepRows
from worker.lora.pages import page_elems_for
from worker.lora.pool import AdapterPool, ModuleFactors, StepTables

REPLAYS = 5
QKV = (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024))  # Llama-3-8B, h_in 4096
OUT_OFFSET = 32  # the single-part ops write columns [32, 32 + h_out) of out


@dataclass(frozen=True)
class Shape:
    op: str  # shrink, expand (one kernel) or site (lora_site over QKV)
    kind: str  # bgmv (row_adapter) or sgmv (segments)
    n: int  # rows (tokens)
    h_in: int
    h_out: int  # the part's output width (site: the sum over QKV)
    rank: int
    pattern: str  # distinct: every row its own adapter; same: one adapter; 4seg: 4 runs of rows, 4 adapters


def _shapes() -> list[Shape]:
    shapes = []
    for op in ("shrink", "expand"):
        for n in (1, 16, 64, 133, 256):
            shapes.append(Shape(op, "bgmv", n, 4096, 4096, 16, "distinct"))
        shapes.append(Shape(op, "bgmv", 133, 4096, 4096, 16, "same"))
        shapes.append(Shape(op, "bgmv", 64, 4096, 4096, 64, "distinct"))
        shapes.append(Shape(op, "bgmv", 64, 4096, 14336, 16, "distinct"))  # gate/up
        shapes.append(Shape(op, "bgmv", 64, 14336, 4096, 16, "distinct"))  # down
        shapes.append(Shape(op, "bgmv", 133, 576, 576, 8, "distinct"))  # the default small model
        for n in (64, 1024, 4096):
            shapes.append(Shape(op, "sgmv", n, 4096, 4096, 16, "4seg"))
    h_qkv = sum(h for _, h in QKV)
    shapes.append(Shape("site", "bgmv", 64, 4096, h_qkv, 16, "distinct"))
    shapes.append(Shape("site", "sgmv", 1024, 4096, h_qkv, 16, "4seg"))
    return shapes


def _time_graph(fn, calls: int) -> float:
    """Seconds per call: `fn(i)` for i in range(calls) captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _time_eager(fn, calls: int) -> float:
    """Seconds per call of `fn()` run eagerly, timed with events (median of REPLAYS runs)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidths() -> dict[str, float]:
    """Bytes per second of 1 GiB device-to-device copies, counting bytes read plus bytes written: an eager
    memcpy, the same memcpy captured in a graph (it may run on a copy engine), and an elementwise kernel."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    return {
        "memcpy": moved / _time_eager(lambda: dst.copy_(src), 10),
        "memcpy in a graph": moved / _time_graph(lambda i: dst.copy_(src), 10),
        "elementwise kernel": moved / _time_graph(lambda i: torch.mul(src, 1.0, out=dst), 10),
    }


def _modules(shape: Shape) -> tuple[tuple[str, int], ...]:
    """(module, h_out) of the parts."""
    return QKV if shape.op == "site" else (("m", shape.h_out),)


def _row_adapters(shape: Shape) -> tuple[int, list[int]]:
    """(G, the adapter g of each row)."""
    num_adapters = {"distinct": shape.n, "same": 1, "4seg": 4}[shape.pattern]
    return num_adapters, [i * num_adapters // shape.n for i in range(shape.n)]  # row i in run i*G//n


def _instance(shape: Shape, dtype: torch.dtype, rows: StepRows) -> dict:
    """One copy of a problem: a pool holding G adapters of the shape's rank, their tables, x, y, out."""
    modules, num_adapters = _modules(shape), len(rows.adapters)
    widths = {shape.h_in, *(h for _, h in modules)}
    need = num_adapters * shape.rank * sum(shape.h_in + h for _, h in modules)
    page = page_elems_for(widths)
    pool = AdapterPool(-(-need // page) + 2 * len(widths) + 2, page, widths, dtype, torch.device("cuda"))
    placed = []
    for _ in range(num_adapters):
        factors = {
            (0, m): ModuleFactors(
                (torch.randn(shape.rank, shape.h_in, device="cuda") * shape.h_in**-0.5).to(dtype),
                (torch.randn(shape.rank, h, device="cuda") * shape.rank**-0.5).to(dtype),
            )
            for m, h in modules
        }
        placed.append(pool.place(factors))
    tables = StepTables.build(placed, [(0, m) for m, _ in modules], torch.device("cuda"))
    parts, offset = [], 0 if shape.op == "site" else OUT_OFFSET
    for m, h in modules:
        a_rows, b_rows, ranks = tables.for_key((0, m))
        host = tuple(tables.host_lora_ranks[tables.index[(0, m)]].tolist())
        parts.append(PoolPart((0, m), pool.view(h), a_rows, b_rows, ranks, host, offset))
        offset += h
    return dict(
        pool=pool,
        parts=parts,
        x=torch.randn(shape.n, shape.h_in, device="cuda").to(dtype),
        y=torch.randn(shape.n, shape.rank, device="cuda"),
        out=torch.randn(shape.n, offset + 64, device="cuda").to(dtype),
    )


def _instances(shape: Shape, dtype: torch.dtype, l2_bytes: int) -> tuple[list[dict], StepRows]:
    """Copies of one problem (enough to cover 4 x L2) plus the shared StepRows."""
    num_adapters, row_adapters = _row_adapters(shape)
    rows = StepRows.build(
        row_adapters, tuple(range(num_adapters)), shape.kind == "sgmv", torch.device("cuda")
    )
    esize = torch.empty((), dtype=dtype).element_size()
    one = (shape.n * shape.h_in + num_adapters * shape.rank * (shape.h_in + shape.h_out)) * esize
    one += shape.n * (shape.h_out + 64) * esize + shape.n * shape.rank * 4
    copies = max(1, min(64, -(-4 * l2_bytes // one)))
    return [_instance(shape, dtype, rows) for _ in range(copies)], rows


def _bytes(shape: Shape, rows: StepRows, esize: int) -> int:
    """The bytes the op must move: x or y in, each used adapter's A or B rows once, y or out (a site:
    the shrink and the expand of every part)."""
    n, r, used = shape.n, shape.rank, len(set(rows.host_segment_adapters))
    shrink = n * shape.h_in * esize + used * r * shape.h_in * esize + n * r * 4
    moved = 0
    for _, h_out in _modules(shape):
        expand = n * r * 4 + used * r * h_out * esize + 2 * n * h_out * esize
        moved += {"shrink": shrink, "expand": expand, "site": shrink + expand}[shape.op]
    return moved


def _kernel_fn(ops: CudaLoraOps, shape: Shape, insts: list[dict], rows: StepRows):
    def fn(i):
        t = insts[i % len(insts)]
        if shape.op == "site":
            ops.lora_site(t["x"], t["pool"].view(shape.h_in), t["parts"], rows, t["out"])
        elif shape.op == "shrink":
            ops._shrink(t["x"], t["pool"].view(shape.h_in), t["parts"][0], rows, t["y"])
        else:
            ops._expand(t["y"], t["parts"][0], rows, t["out"])

    return fn


def _torch_fn(shape: Shape, insts: list[dict], rows: StepRows):
    """The usual fallback: gather each row's A or B rows from the pool by the tables, then a batched
    matmul at the step's R_max."""
    g = rows.row_adapter.long()

    def shrink(t, part):
        a = t["pool"].view(shape.h_in)[part.a_rows[g].long()]  # [n, R, h_in]
        return torch.bmm(a, t["x"].unsqueeze(2)).squeeze(2).float()

    def expand(t, part, y):
        b = part.b_view[part.b_rows[g].long()]  # [n, R, h_out]
        delta = torch.bmm(y.to(b.dtype).unsqueeze(1), b).squeeze(1)
        t["out"][:, part.out_offset : part.out_offset + part.h_out] += delta

    def fn(i):
        t = insts[i % len(insts)]
        if shape.op == "shrink":
            t["y"].copy_(shrink(t, t["parts"][0]))
        elif shape.op == "expand":
            expand(t, t["parts"][0], t["y"])
        else:
            for part in t["parts"]:
                expand(t, part, shrink(t, part))

    return fn


def _kernel_used(ops: CudaLoraOps, fn) -> str:
    """The template instances that one call of fn(0) launches, e.g. 'sgmv_shrink_mma<Bf16, 2, 2>'."""
    names = []
    launch = ops._launch
    ops._launch = lambda name, *args, **kwargs: (names.append(name), launch(name, *args, **kwargs))
    try:
        fn(0)
    finally:
        del ops._launch  # back to the class's method
    return " ".join(dict.fromkeys(n.removeprefix("lora_") for n in names)) or "-"


def floors(ops: CudaLoraOps, dtype: torch.dtype, l2_bytes: int) -> dict[str, float]:
    """Seconds per call of a one-element torch kernel and of the bgmv shrink (n=64) with every rank 0."""
    one = torch.zeros(1, device="cuda")
    shape = Shape("shrink", "bgmv", 64, 4096, 4096, 16, "distinct")
    insts, rows = _instances(shape, dtype, l2_bytes)
    for t in insts:
        t["parts"][0].lora_ranks.zero_()
    return {
        "one-element torch kernel": _time_graph(lambda i: one.add_(1.0), 200),
        "bgmv shrink n=64, all ranks 0": _time_graph(_kernel_fn(ops, shape, insts, rows), 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora_kernels: needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    ops = CudaLoraOps(torch.device("cuda", 0))
    copies = copy_bandwidths()
    copy_bw = max(copies.values())  # the yardstick: the fastest way this device copies
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB")
    measured = ", ".join(f"{name} {bw / 1e9:.0f}" for name, bw in copies.items())
    print(f"measured copy bandwidth (read + write, 1 GiB), GB/s: {measured}; %copy below is of the largest")
    floor = floors(ops, dtype, props.L2_cache_size)
    print("floors (graph replay, per call): " + ", ".join(f"{k} {t * 1e6:.2f} us" for k, t in floor.items()))
    print(f"dtype {dtype}; targets at n >= 64 over distinct adapters: >= 80% copy and ratio <= 0.3")
    header = (
        f"{'op':<7} {'kind':<5} {'n':>5} {'h_in':>6} {'h_out':>6} {'rank':>4} {'pattern':<8} "
        f"{'kernel us':>10} {'GB/s':>7} {'%copy':>6} {'torch us':>9} {'ratio':>6}  {'target':<6} kernels"
    )
    print(header)
    print("-" * len(header))
    esize = torch.empty((), dtype=dtype).element_size()
    for shape in _shapes():
        insts, rows = _instances(shape, dtype, props.L2_cache_size)
        calls = max(20, len(insts))
        used = _kernel_used(ops, _kernel_fn(ops, shape, insts, rows))
        t_kernel = _time_graph(_kernel_fn(ops, shape, insts, rows), calls)
        t_torch = _time_graph(_torch_fn(shape, insts, rows), calls)
        bw = _bytes(shape, rows, esize) / t_kernel
        ratio = t_kernel / t_torch
        target = ""
        if shape.n >= 64 and shape.pattern != "same":
            target = "ok" if bw >= 0.8 * copy_bw and ratio <= 0.3 else "MISS"
        s = shape
        print(
            f"{s.op:<7} {s.kind:<5} {s.n:>5} {s.h_in:>6} {s.h_out:>6} {s.rank:>4} {s.pattern:<8} "
            f"{t_kernel * 1e6:>10.2f} {bw / 1e9:>7.0f} {100 * bw / copy_bw:>5.0f}% {t_torch * 1e6:>9.2f} "
            f"{ratio:>6.2f}  {target:<6} {used}"
        )
        del insts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
