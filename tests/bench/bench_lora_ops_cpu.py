"""Per-call time of the CPU LoRA ops: TorchLoraOps vs the reference loops vs gather+bmm.

Decode-like shapes: 32 tokens over 8 slots with ranks 8/16/32, h_in 576, h_out 576/192/1536, bf16
model dtype (fp32 stacks, as `TorchLoraOps.stack_dtype` asks). bgmv gets the tokens in random slot
order; sgmv gets them sorted by slot (what the runner builds for decode), one segment per slot.
gather+bmm gathers each row's full [max_rank, h] weights and multiplies at max_rank.

Run: .venv/bin/python tests/bench/bench_lora_ops_cpu.py [--tokens 32] [--slots 8] [--max-rank 32]
     [--threads N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import time
import timeit

import torch

from worker.kernels.reference import bgmv_expand_ref, bgmv_shrink_ref, sgmv_expand_ref, sgmv_shrink_ref
from worker.kernels.torch_ops import TorchLoraOps

H_IN = 576
H_OUTS = (576, 192, 1536)
RANK_CYCLE = (8, 16, 32)
# (h_in, h_out) of the 7 LoRA targets of one layer of a 576-wide Llama (q, k, v, o, gate, up, down).
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))


def per_call_us(fn, timer=time.perf_counter, min_time: float = 0.1) -> float:
    """Best-of-5 mean time of fn() in microseconds, with enough calls per round to last min_time."""
    fn()
    number = max(1, int(min_time / max(timeit.timeit(fn, number=1), 1e-7)))
    return min(timeit.repeat(fn, number=number, repeat=5, timer=timer)) / number * 1e6


def make_stack(num_slots: int, max_rank: int, h: int, ranks: list[int], g: torch.Generator) -> torch.Tensor:
    """[num_slots, max_rank, h] float32, zero past each slot's rank (so gather+bmm is also correct)."""
    stack = torch.randn(num_slots, max_rank, h, generator=g) * h**-0.5
    for s, r in enumerate(ranks):
        stack[s, r:] = 0
    return stack


def gather_bmm_shrink(x, lora_a_stack, slot_ids, y) -> None:
    a_rows = lora_a_stack.index_select(0, slot_ids)  # [n, max_rank, h_in]
    y.copy_(torch.bmm(a_rows, x.float().unsqueeze(2)).squeeze(2))


def gather_bmm_expand(y, lora_b_stack, slot_ids, out, out_offset: int) -> None:
    b_rows = lora_b_stack.index_select(0, slot_ids)  # [n, max_rank, h_out]
    dst = out.narrow(1, out_offset, lora_b_stack.shape[2])
    dst.copy_(dst.float() + torch.bmm(y.unsqueeze(1), b_rows).squeeze(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=32)
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
    n, num_slots, max_rank = args.tokens, args.slots, args.max_rank

    g = torch.Generator().manual_seed(0)
    ranks = [RANK_CYCLE[s % len(RANK_CYCLE)] for s in range(num_slots)]
    lora_ranks = torch.tensor(ranks, dtype=torch.int32)
    slot_ids = torch.randint(0, num_slots, (n,), generator=g, dtype=torch.int32)  # [n] random order
    sorted_ids = slot_ids.sort().values
    seg_slots, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    seg_slots = seg_slots.to(torch.int32)
    ops = TorchLoraOps()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} tokens, {num_slots} slots,")
    clock = "CPU time" if args.cpu_time else "wall time"
    print(f"ranks {sorted(set(ranks))}, max_rank {max_rank}, bf16 model dtype, fp32 stacks.")
    print(f"Microseconds per call ({clock}, best of 5 rounds):")
    print(f"{'op':<28}{'TorchLoraOps':>14}{'reference':>12}{'gather+bmm':>12}")

    x = torch.randn(n, H_IN, generator=g).bfloat16()  # [n, h_in]
    a = make_stack(num_slots, max_rank, H_IN, ranks, g)
    y = torch.zeros(n, max_rank)  # [n, max_rank] fp32
    rows = [
        (
            f"bgmv_shrink h_in={H_IN}",
            lambda: ops.bgmv_shrink(x, a, slot_ids, lora_ranks, y),
            lambda: bgmv_shrink_ref(x, a, slot_ids, lora_ranks, y),
            lambda: gather_bmm_shrink(x, a, slot_ids, y),
        ),
        (
            f"sgmv_shrink h_in={H_IN}",
            lambda: ops.sgmv_shrink(x, a, indptr, seg_slots, lora_ranks, y),
            lambda: sgmv_shrink_ref(x, a, indptr, seg_slots, lora_ranks, y),
            lambda: gather_bmm_shrink(x, a, sorted_ids, y),
        ),
    ]
    y = torch.randn(n, max_rank, generator=g)
    for h_out in H_OUTS:
        b = make_stack(num_slots, max_rank, h_out, ranks, g)
        out = torch.randn(n, h_out + 64, generator=g).bfloat16()  # fused output, written at offset 64
        rows += [
            (
                f"bgmv_expand h_out={h_out}",
                lambda b=b, out=out: ops.bgmv_expand(y, b, slot_ids, lora_ranks, out, 64),
                lambda b=b, out=out: bgmv_expand_ref(y, b, slot_ids, lora_ranks, out, 64),
                lambda b=b, out=out: gather_bmm_expand(y, b, slot_ids, out, 64),
            ),
            (
                f"sgmv_expand h_out={h_out}",
                lambda b=b, out=out: ops.sgmv_expand(y, b, indptr, seg_slots, lora_ranks, out, 64),
                lambda b=b, out=out: sgmv_expand_ref(y, b, indptr, seg_slots, lora_ranks, out, 64),
                lambda b=b, out=out: gather_bmm_expand(y, b, sorted_ids, out, 64),
            ),
        ]
    for name, fast, ref, bmm in rows:
        times = per_call_us(fast, timer), per_call_us(ref, timer, 0.05), per_call_us(bmm, timer)
        print(f"{name:<28}{times[0]:>14.1f}{times[1]:>12.1f}{times[2]:>12.1f}")

    total = 0.0
    for h_in, h_out in LAYER:
        xl = torch.randn(n, h_in, generator=g).bfloat16()
        al, bl = (
            make_stack(num_slots, max_rank, h_in, ranks, g),
            make_stack(num_slots, max_rank, h_out, ranks, g),
        )
        outl = torch.zeros(n, h_out, dtype=torch.bfloat16)
        total += per_call_us(
            lambda xl=xl, al=al: ops.sgmv_shrink(xl, al, indptr, seg_slots, lora_ranks, y), timer
        )
        total += per_call_us(
            lambda bl=bl, outl=outl: ops.sgmv_expand(y, bl, indptr, seg_slots, lora_ranks, outl), timer
        )
    print(f"one layer, 7 targets, sgmv shrink+expand: {total:.0f} us")


if __name__ == "__main__":
    main()
