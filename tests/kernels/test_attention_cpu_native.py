"""NativeCpuAttention.paged_attention (`csrc/attention_cpu.cpp`) against `reference.paged_attention_ref`,
and the reference itself against torch SDPA (causal, GQA; a window by an explicit mask).

Caches are built so that reading anything the spec leaves unread fails: every block no sequence owns is
NaN, table entries past a sequence's blocks (padding) point at a NaN block, the slots past context_lens
in a sequence's last block are NaN, and a zero-row sequence's blocks are all NaN. Tables are shuffled
(a sequence's blocks are scattered over the cache). Batches mix decode rows (contexts around block and
vector edges), whole prompts (up to 70 rows, not multiples of a query tile), continuing chunks (rows
after a cached prefix) and a zero-row sequence. Skipped where the extension cannot be built; haswell
(AVX2 only) and skylake-avx512 builds run a subset where this CPU can run them, so an AVX-512 machine
checks the code an AVX2-only one runs.
"""

from __future__ import annotations

import logging
import zlib

import pytest
import torch
import torch.nn.functional as F

from worker.kernels import cpu_attention, cpu_native
from worker.kernels.cpu_attention import NativeCpuAttention, load_native_attention
from worker.kernels.reference import paged_attention_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 out may differ by one rounding of a differently ordered float32 sum.
TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
NAN = float("nan")

# (query rows this step, tokens in the cache including them) per sequence.
LAYOUTS = {
    "mixed": [(70, 70), (1, 1), (0, 9), (23, 64), (1, 37), (17, 17), (1, 130), (2, 2), (1, 16), (5, 100)],
    "decode": [(1, c) for c in (1, 2, 15, 16, 17, 63, 64, 65, 300)],
    "chunks": [(64, 200), (7, 8), (33, 33), (1, 90)],
}


def seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def make_case(layout, num_kv_heads, group, head_dim, block_size, dtype, g, below_window=0):
    """(args of paged_attention without scale and window) for `layout`. below_window > 0: the blocks
    that lie wholly below every row's window of that size are NaN too (they are never visited)."""
    num_heads = num_kv_heads * group
    need = [-(-ctx // block_size) if n else 0 for n, ctx in layout]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)  # shuffled: scattered blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.full(shape, NAN, dtype=dtype), torch.full(shape, NAN, dtype=dtype)
    nan_block = int(perm[-1])  # owned by no sequence
    tables = torch.full((len(layout), max(need) + 3), nan_block, dtype=torch.int32)  # [S, max_blocks]
    used = 0
    for s, (n, ctx) in enumerate(layout):
        if not n:
            continue
        ids = perm[used : used + need[s]]
        used += need[s]
        tables[s, : need[s]] = ids
        pos = torch.arange(ctx)
        first = max(0, ctx - n - below_window + 1) if below_window else 0
        pos = pos[pos >= first // block_size * block_size]  # whole blocks below `first` stay NaN
        blocks, offsets = ids[pos // block_size].long(), pos % block_size
        for cache in (key_cache, value_cache):
            cache[blocks, offsets] = torch.randn(len(pos), num_kv_heads, head_dim, generator=g).to(dtype)
    rows = [n for n, _ in layout]
    q = torch.randn(sum(rows), num_heads, head_dim, generator=g).to(dtype)  # [T, H, D]
    query_starts = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor([ctx for _, ctx in layout], dtype=torch.int32)
    return q, key_cache, value_cache, tables, query_starts, context_lens


def check(ops, case, window, dtype, out=None):
    q, *rest = case
    scale = q.shape[-1] ** -0.5
    expected = paged_attention_ref(q, *rest, scale, window)
    got = ops.paged_attention(q, *rest, scale, window, out=out)
    if out is not None:
        assert got is out
    assert got.shape == q.shape and got.dtype == dtype
    assert got.isfinite().all(), "NaN: a block, slot or padding entry outside the spec was read"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread unless a test sets more (test_threads_and_split_keys): the reference's thousands of
    small torch ops, and any forked call, stall on a busy 2-core machine when they fork."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def native():
    ops = load_native_attention()
    if ops is None:
        pytest.skip("the native CPU attention kernel cannot be built here (see the log)")
    return ops


# Other builds this CPU can run, and the flags they need: haswell is AVX2 without AVX-512 (what AMD EPYC
# dev/CI machines before Zen 4 run), skylake-avx512 is AVX-512 without avx512_bf16.
VARIANTS = {"haswell": ("avx2", "fma", "f16c"), "skylake-avx512": ("avx512f", "avx512bw", "avx512vl")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """The extension built with -march=<variant> (cached like the native build)."""
    flags = cpu_native.cpu_flags().split()
    if not all(f in flags for f in VARIANTS[request.param]) or load_native_attention() is None:
        pytest.skip(f"this CPU cannot run a {request.param} build, or there is no compiler")
    return NativeCpuAttention(cpu_native.build(request.param, source="attention_cpu"))


@pytest.mark.parametrize("block_size", [16, 1, 5])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_ref(native, dtype, group, head_dim, block_size):
    g = seed("ref", dtype, group, head_dim, block_size)
    check(native, make_case(LAYOUTS["mixed"], 2, group, head_dim, block_size, dtype, g), 0, dtype)


@pytest.mark.parametrize("layout", ["decode", "chunks"])
@pytest.mark.parametrize("head_dim", [8, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_head_dims(native, dtype, head_dim, layout):
    """D below a vector and D with a half-vector tail (AVX-512), GQA 3 and MHA."""
    for group, num_kv_heads in ((3, 3), (1, 2)):
        g = seed("small", dtype, head_dim, layout, group)
        check(native, make_case(LAYOUTS[layout], num_kv_heads, group, head_dim, 5, dtype, g), 0, dtype)


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [1, 7, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window(native, dtype, window, block_size):
    """Windows of one key, a few keys (tile edges inside the window) and past every context."""
    for layout in ("mixed", "chunks"):
        g = seed("window", dtype, window, block_size, layout)
        check(native, make_case(LAYOUTS[layout], 3, 3, 64, block_size, dtype, g), window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_below_the_window_are_not_read(native, dtype):
    layout = [(1, 200), (20, 300), (50, 50), (1, 33)]
    g = seed("below", dtype)
    check(native, make_case(layout, 3, 3, 64, 16, dtype, g, below_window=7), 7, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threads_and_split_keys(native, dtype, threads):
    """Long decode contexts at batch 1 and 2 (split over the keys on 2 threads), a long chunk and the
    mixed batch give the same results on 1 and 2 threads, with and without a window."""
    cases = [([(1, 5000)], 0), ([(1, 3000), (1, 700)], 0), ([(1, 4000)], 1500), ([(70, 900), (1, 2000)], 0)]
    cases.append((LAYOUTS["mixed"], 0))
    for layout, window in cases:
        case = make_case(layout, 3, 3, 64, 16, dtype, seed("split", dtype, layout, window))
        torch.set_num_threads(threads)
        q, *rest = case
        got = native.paged_attention(q, *rest, 0.125, window)
        torch.set_num_threads(1)
        rtol, atol = TOL[dtype]
        expected = paged_attention_ref(q, *rest, 0.125, window)
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_q_and_preallocated_out(native, dtype):
    """q as the head view of a fused qkv projection's rows, out preallocated as a strided slice."""
    g = seed("strided", dtype)
    q, *rest = make_case(LAYOUTS["mixed"], 3, 3, 64, 16, dtype, g)
    t, h, d = q.shape
    qkv = torch.randn(t, (h + 6) * d, generator=g).to(dtype)
    qkv[:, : h * d] = q.reshape(t, h * d)
    q_view = qkv[:, : h * d].view(t, h, d)  # row stride (h + 6) * d
    out = torch.full((t, h, 2 * d), NAN, dtype=dtype)[:, :, :d]  # head stride 2 * d
    check(native, (q_view, *rest), 0, dtype, out=out)


def test_no_rows(native):
    q, *rest = make_case([(0, 5), (0, 0)], 3, 3, 64, 16, torch.float32, seed("empty"))
    assert native.paged_attention(q, *rest, 0.125, 0).shape == (0, 9, 64)


def test_padding_entries_are_never_read_nor_checked(native):
    q, kc, vc, tables, starts, lens = make_case(LAYOUTS["decode"], 3, 3, 64, 16, torch.float32, seed("pad"))
    for s, ctx in enumerate(lens.tolist()):
        tables[s, -(-ctx // 16) :] = 10**6  # far outside the cache
    check(native, (q, kc, vc, tables, starts, lens), 0, torch.float32)


def test_rejects_bad_arguments(native):
    layout = [(3, 20), (1, 17)]
    q, kc, vc, tables, starts, lens = make_case(layout, 3, 3, 64, 16, torch.float32, seed("bad"))
    args = dict(
        q=q,
        key_cache=kc,
        value_cache=vc,
        block_tables=tables,
        query_starts=starts,
        context_lens=lens,
        scale=0.125,
        sliding_window=0,
    )

    def with_entry(t, index, value):
        t = t.clone()
        t[index] = value
        return t

    cases = [
        ("q: need", dict(q=q.int())),
        ("q: need", dict(q=q.reshape(4, -1))),
        ("q: need", dict(q=q.transpose(1, 2).contiguous().transpose(1, 2))),
        ("q: head_dim", dict(q=q[..., :12], key_cache=kc[..., :12], value_cache=vc[..., :12])),
        ("key_cache", dict(key_cache=kc.double())),
        ("key_cache", dict(key_cache=kc[..., :32])),
        ("key_cache: H_kv", dict(key_cache=kc[:, :, :2].contiguous(), value_cache=vc[:, :, :2].contiguous())),
        ("value_cache", dict(value_cache=vc[:-1])),
        ("value_cache", dict(value_cache=vc.bfloat16())),
        ("block_tables: need", dict(block_tables=tables.long())),
        ("block_tables: need", dict(block_tables=tables[:1])),
        (r"block_tables\[1, 1\] = -1", dict(block_tables=with_entry(tables, (1, 1), -1))),
        (r"block_tables\[0, 0\] = ", dict(block_tables=with_entry(tables, (0, 0), kc.shape[0]))),
        ("block_tables: sequence 0 needs 2", dict(block_tables=tables[:, :1])),
        ("query_starts: need", dict(query_starts=starts.long())),
        ("query_starts: need", dict(query_starts=starts[:-1])),
        ("query_starts: need query_starts", dict(query_starts=with_entry(starts, 2, 5))),
        ("query_starts: need non-decreasing", dict(query_starts=torch.tensor([0, 5, 4], dtype=torch.int32))),
        (r"context_lens\[0\] = 2", dict(context_lens=with_entry(lens, 0, 2))),
        ("context_lens: need", dict(context_lens=lens.long())),
        ("out: need", dict(out=torch.empty_like(q)[:-1])),
        ("out: need", dict(out=torch.empty_like(q, dtype=torch.bfloat16))),
        ("sliding_window", dict(sliding_window=-1)),
    ]
    for match, kwargs in cases:
        with pytest.raises(ValueError, match=match):
            native.paged_attention(**{**args, **kwargs})


def _contiguous_case(n, ctx, g, dtype=torch.float32):
    """One sequence in blocks 0, 1, ... in order: (q [n, 9, 64], K, V [ctx, 3, 64], the call's args)."""
    q = torch.randn(n, 9, 64, generator=g).to(dtype)
    k, v = (torch.randn(ctx, 3, 64, generator=g).to(dtype) for _ in range(2))
    num_blocks = -(-ctx // 16)
    pad = num_blocks * 16 - ctx
    key_cache, value_cache = (F.pad(t, (0, 0, 0, 0, 0, pad)).view(num_blocks, 16, 3, 64) for t in (k, v))
    tables = torch.arange(num_blocks, dtype=torch.int32)[None]
    starts, lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([ctx], dtype=torch.int32)
    return q, k, v, (q, key_cache, value_cache, tables, starts, lens)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize(("n", "ctx"), [(37, 37), (1, 40), (12, 50)])
def test_ref_matches_sdpa(n, ctx, window):
    """The spec checked independently: torch SDPA over contiguous K/V, causal through is_causal for a
    whole prompt, else through a mask of allowed (row, key) pairs; GQA by enable_gqa."""
    q, k, v, args = _contiguous_case(n, ctx, seed("sdpa", n, ctx, window))
    scale = 64**-0.5
    pos = torch.arange(ctx - n, ctx)[:, None]
    keys = torch.arange(ctx)[None, :]
    mask = (keys <= pos) & ((keys > pos - window) if window else True)  # [n, ctx]
    causal = n == ctx and not window
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, H, n, D]
        k.transpose(0, 1)[None],  # [1, H_kv, ctx, D]
        v.transpose(0, 1)[None],
        attn_mask=None if causal else mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(paged_attention_ref(*args, scale, window), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_builds_match_ref(variant, dtype):
    for layout, window, head_dim, group, block_size in (
        ("mixed", 0, 64, 3, 16),
        ("chunks", 7, 40, 4, 5),
        ("decode", 0, 128, 1, 16),
    ):
        g = seed("variant", dtype, layout)
        case = make_case(LAYOUTS[layout], 2, group, head_dim, block_size, dtype, g)
        check(variant, case, window, dtype)
    q, *rest = make_case([(1, 3000)], 3, 3, 64, 16, dtype, seed("variant split", dtype))
    torch.set_num_threads(2)  # split over the keys
    got = variant.paged_attention(q, *rest, 0.125, 0)
    torch.set_num_threads(1)
    expected = paged_attention_ref(q, *rest, 0.125, 0)
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_failed_build_returns_none_and_logs_once(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_native, "build", no_compiler)
    load_native_attention.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
            assert load_native_attention() is None
            assert load_native_attention() is None
        assert [r.getMessage().count("no compiler here") for r in caplog.records] == [1]
    finally:
        load_native_attention.cache_clear()


def test_build_keys_are_per_source():
    assert cpu_native.build_key("native", "attention_cpu") != cpu_native.build_key("native")
    assert cpu_native.build_key("native", "lora_cpu") == cpu_native.build_key("native")
    with pytest.raises(ValueError, match=r"no C\+\+ kernel source"):
        cpu_native.build_key("native", "../lora_cpu")


def test_prebuild_builds_every_kernel(native, capsys):
    """`python -m worker.kernels.cpu_native` (make test, make serve) builds and names every kernel."""
    assert cpu_native.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names == ["native CPU LoRA kernel", "native CPU attention kernel", "native CPU fused ops"]
    assert not any("unavailable" in line for line in lines)
