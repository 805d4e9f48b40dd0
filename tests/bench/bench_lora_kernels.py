"""Benchmark of the CUDA LoRA kernels (worker/kernels/cuda.py) against a torch gather + bmm.

Run on a CUDA machine from the repository root: `PYTHONPATH=. python tests/bench/bench_lora_kernels.py`.
Prints, per shape: kernel time, effective bandwidth (the bytes of x, the A or B rows of the slots in
use, y and out that the op must move, divided by the time), that bandwidth as a share of the device's
measured copy bandwidth, the gather + bmm time, and kernel / torch. Copy bandwidth counts bytes read plus
bytes written of 1 GiB copies; the yardstick is the fastest of an eager memcpy, a memcpy captured in a
graph (which may run on a copy engine) and an elementwise kernel, and all three are printed.

Times are CUDA-graph replays of many calls (no launch gaps), each call on its own copy of the inputs
in turn, with enough copies to cover four times the L2 cache so the weights come from memory.
Targets (issue 5): at batch >= 64, bandwidth >= 80% of copy and time <= 0.3 x gather + bmm.

Two floors are printed first, to read the small shapes against: a graph replay of a one-element torch
kernel (the per-kernel cost of a replayed graph), and bgmv_shrink at n=64 with every rank 0 (launch,
index loads, no weights). A kernel cannot take less than the second plus its bytes at copy bandwidth.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from worker.kernels.cuda import CudaLoraOps

REPLAYS = 5


@dataclass(frozen=True)
class Shape:
    op: str  # bgmv_shrink, bgmv_expand, sgmv_shrink, sgmv_expand
    n: int  # rows (tokens)
    h_in: int
    h_out: int
    rank: int
    pattern: str  # distinct: every row its own adapter; same: one adapter; 4seg: 4 runs of rows, 4 adapters


def _shapes() -> list[Shape]:
    shapes = []
    for kind in ("shrink", "expand"):
        for n in (1, 16, 64, 133, 256):
            shapes.append(Shape(f"bgmv_{kind}", n, 4096, 4096, 16, "distinct"))
        shapes.append(Shape(f"bgmv_{kind}", 133, 4096, 4096, 16, "same"))
        shapes.append(Shape(f"bgmv_{kind}", 64, 4096, 4096, 64, "distinct"))
        shapes.append(Shape(f"bgmv_{kind}", 64, 4096, 14336, 16, "distinct"))  # gate/up
        shapes.append(Shape(f"bgmv_{kind}", 64, 14336, 4096, 16, "distinct"))  # down
        shapes.append(Shape(f"bgmv_{kind}", 133, 576, 576, 8, "distinct"))  # the default small model
        for n in (64, 1024, 4096):
            shapes.append(Shape(f"sgmv_{kind}", n, 4096, 4096, 16, "4seg"))
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


def _instances(shape: Shape, dtype: torch.dtype, l2_bytes: int) -> tuple[list[dict], dict]:
    """Copies of one problem (enough to cover 4 x L2) plus the shared index tensors."""
    n, h_in, h_out, rank = shape.n, shape.h_in, shape.h_out, shape.rank
    num_adapters = {"distinct": n, "same": 1, "4seg": 4}[shape.pattern]
    num_slots = num_adapters + 1
    i32 = dict(dtype=torch.int32, device="cuda")
    idx = dict(lora_ranks=torch.tensor([0] + [rank] * num_adapters, **i32))
    bounds = [-(-n * g // num_adapters) for g in range(num_adapters + 1)]  # row i is in segment i*A//n
    idx["segment_indptr"] = torch.tensor(bounds, **i32)
    idx["segment_slot_ids"] = torch.arange(1, num_slots, **i32)
    idx["slot_ids"] = (torch.arange(n, device="cuda") * num_adapters // n + 1).to(torch.int32)  # segment + 1
    esize = torch.empty((), dtype=dtype).element_size()
    one = (n * h_in + num_slots * rank * (h_in + h_out) + n * (h_out + 64)) * esize + n * rank * 4
    copies = max(1, min(64, -(-4 * l2_bytes // one)))
    insts = []
    for _ in range(copies):
        insts.append(
            dict(
                x=torch.randn(n, h_in, device="cuda").to(dtype),
                lora_a_stack=(torch.randn(num_slots, rank, h_in, device="cuda") * h_in**-0.5).to(dtype),
                lora_b_stack=(torch.randn(num_slots, rank, h_out, device="cuda") * rank**-0.5).to(dtype),
                y=torch.randn(n, rank, device="cuda"),
                out=torch.randn(n, h_out + 64, device="cuda").to(dtype),
            )
        )
    return insts, idx


def _bytes(shape: Shape, idx: dict, esize: int) -> int:
    """The bytes the op must move: x or y in, each used slot's A or B rows once, y or out."""
    n, rank = shape.n, shape.rank
    adapters = len(set(idx["slot_ids"].tolist()))
    if shape.op.endswith("shrink"):
        return n * shape.h_in * esize + adapters * rank * shape.h_in * esize + n * rank * 4
    return n * rank * 4 + adapters * rank * shape.h_out * esize + 2 * n * shape.h_out * esize


def _kernel_used(ops: CudaLoraOps, fn) -> str:
    """The template instance that one call of fn(0) launches, e.g. 'sgmv_shrink_mma<Bf16, 2, 2>'."""
    names = []
    launch = ops._launch
    ops._launch = lambda name, *args, **kwargs: (names.append(name), launch(name, *args, **kwargs))
    try:
        fn(0)
    finally:
        del ops._launch  # back to the class's method
    return names[0].removeprefix("lora_") if names else "-"


def floors(ops: CudaLoraOps, dtype: torch.dtype, l2_bytes: int) -> dict[str, float]:
    """Seconds per call of a one-element torch kernel and of bgmv_shrink (n=64) with every rank 0."""
    one = torch.zeros(1, device="cuda")
    shape = Shape("bgmv_shrink", 64, 4096, 4096, 16, "distinct")
    insts, idx = _instances(shape, dtype, l2_bytes)
    idx["lora_ranks"].zero_()
    return {
        "one-element torch kernel": _time_graph(lambda i: one.add_(1.0), 200),
        "bgmv_shrink n=64, all ranks 0": _time_graph(_kernel_fn(ops, shape, insts, idx), 200),
    }


def _kernel_fn(ops: CudaLoraOps, shape: Shape, insts: list[dict], idx: dict):
    kind, op = shape.op.split("_")
    where = (idx["slot_ids"],) if kind == "bgmv" else (idx["segment_indptr"], idx["segment_slot_ids"])
    call = getattr(ops, shape.op)

    def fn(i):
        t = insts[i % len(insts)]
        if op == "shrink":
            call(t["x"], t["lora_a_stack"], *where, idx["lora_ranks"], t["y"])
        else:
            call(t["y"], t["lora_b_stack"], *where, idx["lora_ranks"], t["out"], 32)

    return fn


def _torch_fn(shape: Shape, insts: list[dict], idx: dict):
    """The usual fallback: gather each row's A or B, then a batched matmul at the stack's max rank."""
    rows = idx["slot_ids"].long()
    h_out = shape.h_out

    def fn(i):
        t = insts[i % len(insts)]
        if shape.op.endswith("shrink"):
            a = t["lora_a_stack"][rows]  # [n, rank, h_in]
            t["y"].copy_(torch.bmm(a, t["x"].unsqueeze(2)).squeeze(2))
        else:
            b = t["lora_b_stack"][rows]  # [n, rank, h_out]
            delta = torch.bmm(t["y"].to(b.dtype).unsqueeze(1), b).squeeze(1)
            t["out"][:, 32 : 32 + h_out] += delta

    return fn


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
        f"{'op':<12} {'n':>5} {'h_in':>6} {'h_out':>6} {'rank':>4} {'pattern':<8} {'kernel us':>10} "
        f"{'GB/s':>7} {'%copy':>6} {'torch us':>9} {'ratio':>6}  {'target':<6} kernel"
    )
    print(header)
    print("-" * len(header))
    esize = torch.empty((), dtype=dtype).element_size()
    for shape in _shapes():
        insts, idx = _instances(shape, dtype, props.L2_cache_size)
        calls = max(20, len(insts))
        used = _kernel_used(ops, _kernel_fn(ops, shape, insts, idx))
        t_kernel = _time_graph(_kernel_fn(ops, shape, insts, idx), calls)
        t_torch = _time_graph(_torch_fn(shape, insts, idx), calls)
        bw = _bytes(shape, idx, esize) / t_kernel
        ratio = t_kernel / t_torch
        target = ""
        if shape.n >= 64 and shape.pattern != "same":
            target = "ok" if bw >= 0.8 * copy_bw and ratio <= 0.3 else "MISS"
        s = shape
        print(
            f"{s.op:<12} {s.n:>5} {s.h_in:>6} {s.h_out:>6} {s.rank:>4} {s.pattern:<8} "
            f"{t_kernel * 1e6:>10.2f} {bw / 1e9:>7.0f} {100 * bw / copy_bw:>5.0f}% {t_torch * 1e6:>9.2f} "
            f"{ratio:>6.2f}  {target:<6} {used}"
        )
        del insts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
