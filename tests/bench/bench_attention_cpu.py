"""Milliseconds per layer call of CPU paged attention: the native kernel (`csrc/attention_cpu.cpp`,
NativeCpuAttention.paged_attention, one call for all rows) against the torch path it replaces (the
logic of `worker/layers/attention.py`'s _decode / _prefill, copied below: decode rows gather their
blocks into a padded tensor and run one masked SDPA call; each prompt is one causal SDPA call over its
own K/V; a continuing chunk copies its cached prefix out of the cache first and runs with a mask).

SmolLM2-135M shapes: H 9, H_kv 3, D 64, block size 16; bf16 and float32. The cache is fragmented
(tables are a random permutation of the blocks, as after churn). The torch path's decode mask is made
once outside the timing, as a step shares it across its 30 layers. The two paths' outputs are compared
once before timing. Threads: torch.get_num_threads(), as the server runs (--threads to change).
`--layers N` gives each case N caches of its own, called in turn as a step's layers are: with N = 30 a
call finds its K/V no longer in the caches the previous calls filled, as in a real step (N = 1, the
default, times one cache over and over: the kernel's own speed, its K/V warm).
Run: .venv/bin/python tests/bench/bench_attention_cpu.py [--case NAME]... [--dtype bf16|fp32]
     [--threads N] [--min-time 0.5] [--layers 1]
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time

import torch
import torch.nn.functional as F

from worker.kernels.cpu_attention import load_native_attention

H, H_KV, D, BLOCK = 9, 3, 64, 16
SCALE = D**-0.5
_mixed = random.Random(0)
# name -> [(query rows this step, tokens in the cache including them)] per sequence
CASES = {
    "decode 1x512": [(1, 512)],
    "decode 1x8000": [(1, 8000)],
    "decode 16x512": [(1, 512)] * 16,
    "decode 64x256": [(1, 256)] * 64,
    "decode 32 mixed 64-4000": [(1, _mixed.randint(64, 4000)) for _ in range(32)],
    "prompt 1x512": [(512, 512)],
    "prompt 4x128": [(128, 128)] * 4,
    "prompt 1x2048": [(2048, 2048)],
    "chunk 64 after 8000": [(64, 8064)],
    "chunk 512 after 8000": [(512, 8512)],
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(layout, dtype, g):
    """The kernel's arguments (without scale and window) over a fragmented cache, plus each new
    sequence's own K/V rows (what the torch prefill path takes for a whole prompt)."""
    need = [-(-ctx // BLOCK) for _, ctx in layout]
    num_blocks = sum(need) + 1
    shape = (num_blocks, BLOCK, H_KV, D)
    key_cache = torch.randn(shape, generator=g).to(dtype)
    value_cache = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.zeros(len(layout), max(need), dtype=torch.int32)  # [S, max_blocks], padded with 0
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used : used + n]
        used += n
    rows = [n for n, _ in layout]
    q = torch.randn(sum(rows), H, D, generator=g).to(dtype)  # [T, H, D]
    starts = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([ctx for _, ctx in layout], dtype=torch.int32)
    return q, key_cache, value_cache, tables, starts, lens


class TorchPath:
    """worker/layers/attention.py's torch path for one layer, over the same arguments: the sequences
    with one row are decode rows (after the new ones, as the server orders them)."""

    def __init__(self, q, key_cache, value_cache, tables, starts, lens):
        self.key_cache, self.value_cache = key_cache, value_cache
        rows = (starts[1:] - starts[:-1]).tolist()
        self.num_new = sum(n > 1 for n in rows)
        assert all(n == 1 for n in rows[self.num_new :]), "new sequences first, then decode rows"
        self.query_lens, self.lens, self.tables = rows[: self.num_new], lens, tables
        self.prefix_lens = [int(c) - n for c, n in zip(lens[: self.num_new], self.query_lens, strict=True)]
        self.split = sum(self.query_lens)
        flat = (-1, H_KV, D)
        slots = [
            int(tables[s, k // BLOCK]) * BLOCK + k % BLOCK
            for s, n in enumerate(self.query_lens)
            for k in range(int(lens[s]) - n, int(lens[s]))
        ]
        # The new rows' own K/V [rows, H_kv, D]: the projections the layer just wrote into the cache.
        self.k_new = key_cache.view(flat)[slots] if slots else None
        self.v_new = value_cache.view(flat)[slots] if slots else None
        decode_tables = tables[self.num_new :]
        self.max_decode_blocks = int((-(-lens[self.num_new :] // BLOCK)).max()) if len(decode_tables) else 0
        span = self.max_decode_blocks * BLOCK
        pos = torch.arange(span)[None, :]
        self.decode_mask = (pos < lens[self.num_new :, None])[:, None, None, :]  # [num_seqs, 1, 1, span]

    def __call__(self, q):
        parts = []
        if self.split:
            parts.append(self._prefill(q[: self.split]))
        if self.split < q.shape[0]:
            parts.append(self._decode(q[self.split :]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prefill(self, q):
        outs, start = [], 0
        for i, (n, cached) in enumerate(zip(self.query_lens, self.prefix_lens, strict=True)):
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if cached:
                blocks = self.tables[i, : -(-(cached + n) // BLOCK)]
                ki, vi = (self._cached(c, blocks, cached + n) for c in (self.key_cache, self.value_cache))
                q_pos = torch.arange(cached, cached + n)[:, None]
                mask = q_pos - torch.arange(cached + n)[None, :] >= 0  # [n, cached + n]
            else:
                ki, vi = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (self.k_new, self.v_new))
                mask = None
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=SCALE, enable_gqa=True
            )
            outs.append(o.squeeze(0).transpose(0, 1))  # [n, H, D]
            start += n
        return torch.cat(outs)

    @staticmethod
    def _cached(cache, blocks, num_tokens):
        flat = cache.index_select(0, blocks).view(-1, H_KV, D)  # [span, H_kv, D]
        return flat[:num_tokens].transpose(0, 1).unsqueeze(0)

    def _decode(self, q):
        tables = self.tables[self.num_new :, : self.max_decode_blocks]
        num_seqs, max_blocks = tables.shape
        shape = (num_seqs, max_blocks * BLOCK, H_KV, D)
        blocks = tables.reshape(-1)
        keys = self.key_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        values = self.value_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=self.decode_mask, scale=SCALE, enable_gqa=True
        )
        return o.squeeze(2)  # [num_seqs, H, D]


def time_ms(fn, min_time: float) -> float:
    """Median milliseconds per call over batches of calls lasting min_time / 5 seconds each."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(min_time / 5 / once))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return sorted(samples)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES))
    parser.add_argument("--dtype", action="append", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per path and case")
    parser.add_argument("--layers", type=int, default=1, help="caches per case, called in turn")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    native = load_native_attention()
    if native is None:
        print("the native attention kernel cannot be built here", file=sys.stderr)
        return 1
    print(f"threads {torch.get_num_threads()}; H {H}, H_kv {H_KV}, D {D}, block {BLOCK}; ms per layer call")
    print(f"{'case':<26}{'dtype':>6}{'torch':>10}{'native':>10}{'speedup':>9}")
    for dtype_name in args.dtype or list(DTYPES):
        dtype = DTYPES[dtype_name]
        for name in args.case or list(CASES):
            g = torch.Generator().manual_seed(0)
            layers = [make_inputs(CASES[name], dtype, g) for _ in range(args.layers)]
            q, *rest = layers[0]
            baselines = [TorchPath(*inputs) for inputs in layers]
            out = torch.empty_like(q)
            expected, got = baselines[0](q), native.paged_attention(q, *rest, SCALE, 0, out=out)
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
            torch_calls = itertools.cycle([(b, inp[0]) for b, inp in zip(baselines, layers, strict=True)])
            native_calls = itertools.cycle(layers)

            def call_torch(calls=torch_calls):
                baseline, q = next(calls)
                baseline(q)

            def call_native(calls=native_calls, out=out):
                q, *rest = next(calls)
                native.paged_attention(q, *rest, SCALE, 0, out=out)

            t_torch = time_ms(call_torch, args.min_time)
            t_native = time_ms(call_native, args.min_time)
            print(f"{name:<26}{dtype_name:>6}{t_torch:>10.3f}{t_native:>10.3f}{t_torch / t_native:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
