"""CudaLoraOps (csrc/lora_gather_matmul.cu) over a real AdapterPool on CUDA, against `lora_site_ref`.

The pool is fragmented the way serving leaves it: fillers placed between the adapters under test and
released (their rows NaN again), one adapter released and its rows partly reused by a smaller one, so
the adapters' rows are scattered among NaN rows, and every table entry past a rank is PAD_ROW. A kernel
that reads a row it must not turns its output NaN (or, for a PAD_ROW, would fault), so comparing with
the reference and checking that nothing outside the written columns changed catches it.

The reference loops run on the GPU (float32 matmuls per row, TF32 off) with the ranks and row adapters
they read on the host, so they never synchronise per row. Skipped without CUDA (tests/conftest.py);
tests/gpu/run.sh runs them on a GPU machine (`-m gpu`).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from worker.kernels.pool_args import PoolPart, StepRows
from worker.kernels.reference import lora_site_ref
from worker.lora.pages import page_elems_for
from worker.lora.pool import PAD_ROW, AdapterPool, ModuleFactors, StepTables

pytestmark = pytest.mark.gpu

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Model widths: "small" (SmolLM2) has 16-byte rows in every dtype (16-byte accesses, tensor-core sgmv in
# bf16 / fp16); "odd" has none (one element per access, generic sgmv); "llama" (Llama-3-8B) is wide.
DIMS = {
    "small": dict(hidden=576, kv=192, inter=1536, layers=2),
    "odd": dict(hidden=45, kv=27, inter=75, layers=2),
    "llama": dict(hidden=4096, kv=1024, inter=14336, layers=1),
}
# module -> (input width, output width), as names into DIMS.
WIDTHS = {
    "q_proj": ("hidden", "hidden"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "o_proj": ("hidden", "hidden"),
    "gate_proj": ("hidden", "inter"),
    "up_proj": ("hidden", "inter"),
    "down_proj": ("inter", "hidden"),
}
# A LoRA site: the modules reading one input, each writing its own columns of the layer's output.
SITES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# The step's adapters (module -> rank, the same on every layer unless `layers` says otherwise): ranks 1
# to 64 and one above, mixed module sets, ranks that differ per module (peft's rank_pattern).
ADAPTERS = [
    dict(ranks={m: 1 for m in MODULES}),
    dict(ranks={"q_proj": 3, "v_proj": 3}),
    dict(ranks={"k_proj": 8, "gate_proj": 8, "down_proj": 8}, layers=(1,)),  # layer 1 only (if any)
    dict(ranks={"q_proj": 16, "k_proj": 4, "v_proj": 9, "o_proj": 16, "up_proj": 2}),
    dict(ranks={"gate_proj": 64, "up_proj": 64, "down_proj": 64}),
    dict(ranks={m: 96 for m in MODULES}),
    dict(ranks={m: 33 for m in MODULES}),  # placed into the rows a released rank-40 adapter left
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rtol, atol) for `out` in the model dtype: one rounding of a differently ordered fp32 sum may differ by
# an ulp (the x@A products of 16-bit floats are exact in fp32; only the order of the sums differs).
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
# How the rows reach the kernels: bgmv (row_adapter), sgmv through the generic kernels, through the
# tensor-core kernels (forced even for short segments), and through their 32 x 16 shrink tiles (taken at
# thousands of rows; forced by claiming one SM).
KINDS = ["bgmv", "sgmv", "sgmv-mma", "sgmv-mma-32x16"]


def _gen(*parts, device="cpu") -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash)."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(parts).encode()))


def _keys(dims: dict) -> list[tuple[int, str]]:
    return [(layer, m) for layer in range(dims["layers"]) for m in MODULES]


def _factors(spec: dict, dims: dict, dtype, g: torch.Generator) -> dict:
    """(layer, module) -> A [r, h_in] ~ N(0, 1 / h_in) and B^T [r, h_out] ~ N(0, 1 / r), so y and the
    delta are O(1) like x and out."""
    factors = {}
    layers = [layer for layer in spec.get("layers", ()) if layer < dims["layers"]] or range(dims["layers"])
    for layer in layers:
        for m, r in spec["ranks"].items():
            h_in, h_out = (dims[w] for w in WIDTHS[m])
            a = torch.randn(r, h_in, generator=g) * h_in**-0.5
            b_t = torch.randn(r, h_out, generator=g) * r**-0.5
            factors[(layer, m)] = ModuleFactors(a.to(dtype), b_t.to(dtype))
    return factors


_POOLS: dict = {}


def pool_and_adapters(dtype, dims_name: str):
    """(pool, the AdapterRows of ADAPTERS), built once per dtype and dims: see the module docstring."""
    key = (dtype, dims_name)
    if key not in _POOLS:
        dims = DIMS[dims_name]
        g = _gen("pool", dtype, dims_name)
        widths = {dims[w] for pair in WIDTHS.values() for w in pair}
        elems = 2 * dims["layers"] * 1200 * sum(widths)  # room for every adapter below, twice over
        page = page_elems_for(widths)
        pool = AdapterPool(-(-elems // page), page, widths, dtype, "cuda", fill_all=True)
        filler = dict(ranks={m: 2 for m in MODULES})
        fillers = [pool.place(_factors(dict(ranks={m: 5 for m in MODULES}), dims, dtype, g))]
        placed = []
        for spec in ADAPTERS[:-1]:
            placed.append(pool.place(_factors(spec, dims, dtype, g)))
            fillers.append(pool.place(_factors(filler, dims, dtype, g)))
        doomed = pool.place(_factors(dict(ranks={m: 40 for m in MODULES}), dims, dtype, g))
        fillers.append(pool.place(_factors(filler, dims, dtype, g)))
        for f in fillers:
            pool.release(f)
        pool.release(doomed)
        placed.append(pool.place(_factors(ADAPTERS[-1], dims, dtype, g)))  # in part of doomed's rows
        assert pool.storage.isnan().any(), "the pool should hold released (NaN) rows between live ones"
        _POOLS[key] = (pool, placed)
    return _POOLS[key]


def make_parts(pool, tables: StepTables, site: str, layer: int, dims: dict) -> list[PoolPart]:
    parts, offset = [], 0
    for m in SITES[site]:
        key = (layer, m)
        a_rows, b_rows, ranks = tables.for_key(key)
        h_out = dims[WIDTHS[m][1]]
        host = tuple(tables.host_lora_ranks[tables.index[key]].tolist())
        parts.append(PoolPart(key, pool.view(h_out), a_rows, b_rows, ranks, host, offset))
        offset += h_out
    return parts


def make_rows(kind: str, n: int, num_adapters: int, handles, g: torch.Generator) -> StepRows:
    """bgmv: each row any adapter, about a third none (decode). sgmv: runs of 1 to 40 rows per adapter,
    some runs without one (prefill, grouped by adapter)."""
    if kind == "bgmv":
        ids = torch.randint(0, num_adapters, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.35] = -1
        row_adapters = ids.tolist()
    else:
        row_adapters = []
        while len(row_adapters) < n:
            a = int(torch.randint(-1, num_adapters, (1,), generator=g))
            row_adapters += [a] * int(torch.randint(1, 41, (1,), generator=g))
        row_adapters = row_adapters[:n]
    return StepRows.build(row_adapters, tuple(handles), kind != "bgmv", torch.device("cuda"))


def run_ref(x, a_view, parts, rows, out) -> None:
    """lora_site_ref with the ranks and row adapters on the host (its `int()`s never synchronise) and
    the row tables on the device (its gathers take no host-to-device copy)."""
    host = [replace(p, lora_ranks=p.lora_ranks.cpu()) for p in parts]
    lora_site_ref(x, a_view, host, SimpleNamespace(row_adapter=rows.row_adapter.cpu()), out)


def assert_out_matches(got, want, before, parts, rows, what: str) -> None:
    """got equals the reference within the dtype's tolerance, holds no NaN, and is bit-identical to
    `before` wherever no part writes (other columns, rows without an adapter targeting the part)."""
    assert not got.isnan().any(), f"{what}: NaN in out (a NaN pool row, or a PAD_ROW, was read)"
    rtol, atol = OUT_TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    written = torch.zeros_like(got, dtype=torch.bool)
    row_adapter = rows.row_adapter.cpu().tolist()
    for p in parts:
        for i, g in enumerate(row_adapter):
            if g >= 0 and p.host_lora_ranks[g] > 0:
                written[i, p.out_offset : p.out_offset + p.h_out] = True
    assert torch.equal(got[~written], before[~written]), f"{what}: out changed where no part writes"


@contextmanager
def launched(ops):
    """The kernel names launched inside the block."""
    names: list[str] = []
    launch = ops._launch
    ops._launch = lambda name, *args, **kwargs: (names.append(name), launch(name, *args, **kwargs))
    try:
        yield names
    finally:
        del ops._launch  # back to the class's method


def _use_kind(ops, monkeypatch, kind: str) -> None:
    monkeypatch.setattr(ops, "sgmv_mma_min_rows_per_segment", 0 if kind.startswith("sgmv-mma") else 8)
    if kind == "sgmv-mma-32x16":
        monkeypatch.setattr(ops, "_num_sms", 1)


@pytest.fixture(scope="module")
def ops():
    """The ops for the current CUDA device; float32 reference matmuls stay in full fp32 (no TF32)."""
    from worker.kernels import select_lora_ops

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield select_lora_ops(torch.device("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_selected_once_for_cuda(ops):
    from worker.kernels.cuda import CudaLoraOps

    assert isinstance(ops, CudaLoraOps)
    assert ops.decode_uses_segments is False
    for dtype in DTYPES:
        assert ops.pool_dtype(dtype) == dtype
    with pytest.raises(ValueError, match="float64"):
        ops.pool_dtype(torch.float64)
    assert ops.row_order([3, 0, 3, 1, 0], {3: 8, 1: 64}) == [1, 4, 3, 0, 2]  # by adapter, stable


def test_tensor_core_sgmv_is_enabled(ops):
    """sm_80+ runs the tensor-core sgmv kernels: the shrink kernel's shared memory was granted."""
    if torch.cuda.get_device_capability(ops.device) < (8, 0):
        pytest.skip("mma.sync needs sm_80")
    assert ops._mma


def _cases():
    for dims in ("small", "odd"):
        for dtype in DTYPES:
            for kind in KINDS:
                if kind.startswith("sgmv-mma") and (dims == "odd" or dtype == torch.float32):
                    continue  # the tensor-core kernels take 16-bit, 16-byte rows only: same as "sgmv"
                for n in (1, 7, 133):
                    if kind == "sgmv-mma-32x16" and n < 133:
                        continue
                    yield pytest.param(dims, dtype, kind, n, id=f"{dims}-{str(dtype)[6:]}-{kind}-n{n}")
    for kind in ("bgmv", "sgmv-mma", "sgmv-mma-32x16"):
        yield pytest.param("llama", torch.bfloat16, kind, 133, id=f"llama-bfloat16-{kind}-n133")


@pytest.mark.parametrize("site, layer", [("qkv", 0), ("o", 1), ("gate_up", 1), ("down", 0)])
@pytest.mark.parametrize("dims, dtype, kind, n", list(_cases()))
def test_site_matches_ref(ops, monkeypatch, dims, dtype, kind, n, site, layer):
    layer = min(layer, DIMS[dims]["layers"] - 1)
    pool, adapters = pool_and_adapters(dtype, dims)
    g = _gen(dims, dtype, kind, n, site, layer)
    step = adapters[::-1] if n % 2 else adapters  # g is not the placement order
    tables = StepTables.build(step, _keys(DIMS[dims]), torch.device("cuda"))
    parts = make_parts(pool, tables, site, layer, DIMS[dims])
    rows = make_rows(kind, n, len(step), [a.handle for a in step], g)
    h_in = DIMS[dims][WIDTHS[SITES[site][0]][0]]
    x = torch.randn(n, h_in, generator=g).to(dtype).cuda()
    before = torch.randn(n, sum(p.h_out for p in parts) + 24, generator=g).to(dtype).cuda()
    _use_kind(ops, monkeypatch, kind)
    got, want = before.clone(), before.clone()
    with launched(ops) as names:
        ops.lora_site(x, pool.view(h_in), parts, rows, got)
    run_ref(x, pool.view(h_in), parts, rows, want)
    assert_out_matches(got, want, before, parts, rows, f"{dims} {dtype} {kind} n={n} {site}")
    if names and kind.startswith("sgmv-mma") and dtype != torch.float32 and dims != "odd":
        assert all("_mma<" in name for name in names), names  # the 16-byte pool rows took tensor cores
    if names and kind == "bgmv":
        assert all("bgmv" in name for name in names), names


@pytest.mark.parametrize("launch_all", [False, True], ids=["eager", "as-under-capture"])
@pytest.mark.parametrize("kind", KINDS[:3])
def test_rows_without_adapters_and_parts_without_ranks_are_untouched(ops, monkeypatch, kind, launch_all):
    """No row with an adapter, or adapters that target none of the site's modules: out bit-identical.
    Eager calls skip such parts on the host; under capture every part is launched and the kernels skip
    the rows (g == -1, rank 0) on the device."""
    _use_kind(ops, monkeypatch, kind)
    if launch_all:
        monkeypatch.setattr(ops, "_capturing", lambda: True)
    pool, adapters = pool_and_adapters(torch.bfloat16, "small")
    mlp_only = [adapters[4]]
    tables = StepTables.build(mlp_only, _keys(DIMS["small"]), torch.device("cuda"))
    parts = make_parts(pool, tables, "qkv", 0, DIMS["small"])
    x = torch.randn(40, 576, device="cuda").to(torch.bfloat16)
    before = torch.randn(40, 576 + 2 * 192, device="cuda").to(torch.bfloat16)
    for row_adapters in ([-1] * 40, [0] * 40, [0, -1] * 20):
        rows = StepRows.build(row_adapters, (adapters[4].handle,), kind != "bgmv", torch.device("cuda"))
        out = before.clone()
        with launched(ops) as names:
            ops.lora_site(x, pool.view(576), parts, rows, out)
        assert torch.equal(out, before)
        assert len(names) == (6 if launch_all else 0)


def test_strided_x_and_out(ops):
    """x and out may be column slices of wider buffers (rows strided); the pool views are dense."""
    pool, adapters = pool_and_adapters(torch.bfloat16, "small")
    tables = StepTables.build(adapters, _keys(DIMS["small"]), torch.device("cuda"))
    parts = make_parts(pool, tables, "gate_up", 0, DIMS["small"])
    for kind in ("bgmv", "sgmv"):
        rows = make_rows(kind, 41, len(adapters), [a.handle for a in adapters], _gen("strided", kind))
        wide_x = torch.randn(41, 576 + 64, device="cuda").to(torch.bfloat16)
        x = wide_x[:, 32 : 32 + 576]
        wide_out = torch.randn(41, 2 * 1536 + 80, device="cuda").to(torch.bfloat16)
        before = wide_out.clone()
        ops.lora_site(x, pool.view(576), parts, rows, wide_out[:, 40 : 40 + 2 * 1536])
        want = before.clone()
        run_ref(x, pool.view(576), parts, rows, want[:, 40 : 40 + 2 * 1536])
        torch.testing.assert_close(wide_out.float(), want.float(), rtol=1.6e-2, atol=1e-2)
        assert torch.equal(wide_out[:, :40], before[:, :40]) and torch.equal(
            wide_out[:, -40:], before[:, -40:]
        )


def _dense_delta(x, a_view, part: PoolPart, row_adapter: torch.Tensor) -> torch.Tensor:
    """[T, h_out] float32: the delta of every row, one matmul pair per adapter (a vectorised reference)."""
    delta = torch.zeros(x.shape[0], part.h_out, device=x.device)
    a_rows, b_rows = part.a_rows.cpu(), part.b_rows.cpu()
    for g, r in enumerate(part.host_lora_ranks):
        idx = (row_adapter == g).nonzero().squeeze(1)
        if r and idx.numel():
            a = a_view[a_rows[g, :r].long()].float()
            b_t = part.b_view[b_rows[g, :r].long()].float()
            delta[idx] = (x[idx].float() @ a.T) @ b_t
    return delta


@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_many_tokens(ops, kind):
    """More rows than a grid's y dimension allows (65535): rows are on grid x."""
    n, dtype = 70_001, torch.float16
    pool, adapters = pool_and_adapters(dtype, "small")
    tables = StepTables.build(adapters, _keys(DIMS["small"]), torch.device("cuda"))
    (part,) = make_parts(pool, tables, "o", 0, DIMS["small"])
    rows = make_rows(kind, n, len(adapters), [a.handle for a in adapters], _gen("many", kind))
    x = torch.randn(n, 576, device="cuda").to(dtype)
    before = torch.randn(n, 576, device="cuda").to(dtype)
    got = before.clone()
    ops.lora_site(x, pool.view(576), [part], rows, got)
    row_adapter = rows.row_adapter.long()
    want = (before.float() + _dense_delta(x, pool.view(576), part, row_adapter)).to(dtype)
    loop = before[:300].clone()  # the vectorised reference against the loop on some rows
    run_ref(x[:300], pool.view(576), [part], SimpleNamespace(row_adapter=rows.row_adapter[:300]), loop)
    torch.testing.assert_close(want[:300].float(), loop.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_corrupt_row_ids_give_nan_and_never_a_read(ops, monkeypatch, kind):
    """A table entry below the rank that is not a row of its view (-1, or one past the end) is never
    dereferenced: the rows of that adapter come out NaN in the part's columns, the other rows exact.
    The views lie inside a larger buffer of finite values, so a kernel that did read such a row would
    give finite (wrong) numbers instead of faulting."""
    _use_kind(ops, monkeypatch, kind)
    dtype, n_rows, w = torch.bfloat16, 64, 256
    backing = torch.ones(3 * (n_rows + 2) * w, dtype=dtype, device="cuda")
    views = [backing[(k * (n_rows + 2) + 1) * w :][: n_rows * w].view(n_rows, w) for k in range(3)]
    for v in views:
        v.normal_(0.0, w**-0.5)
    a_view, b_view = views[0], views[1]
    i32 = dict(dtype=torch.int32, device="cuda")
    good = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], **i32)
    for which, bad_id in [("a", -1), ("a", n_rows), ("b", -1), ("b", n_rows)]:
        a_rows, b_rows = good.clone(), good.clone()
        (a_rows if which == "a" else b_rows)[1, 2] = bad_id  # adapter 1, rank row 2 of 4
        part = PoolPart((0, "o_proj"), b_view, a_rows, b_rows, torch.tensor([4, 4], **i32), (4, 4), 0)
        rows = StepRows.build([0] * 20 + [1] * 20 + [-1] * 8, (1, 2), kind != "bgmv", torch.device("cuda"))
        x = torch.randn(48, w, device="cuda").to(dtype)
        before = torch.randn(48, w, device="cuda").to(dtype)
        out = before.clone()
        ops.lora_site(x, a_view, [part], rows, out)
        torch.cuda.synchronize()  # a fault would surface here
        assert out[20:40].isnan().all(), (which, bad_id)
        want = before.clone()
        ok_part = replace(part, a_rows=good, b_rows=good)
        run_ref(x[:20], a_view, [ok_part], SimpleNamespace(row_adapter=rows.row_adapter[:20]), want[:20])
        torch.testing.assert_close(out[:20].float(), want[:20].float(), rtol=1.6e-2, atol=1e-2)
        assert torch.equal(out[40:], before[40:])


def _fill(bufs: dict, step, keys) -> tuple:
    """Copy `step`'s tables into the fixed buffers (PAD_ROW past each adapter's rank rows); the host ranks."""
    tables = StepTables.build(step, keys, torch.device("cuda"))
    r = tables.a_rows.shape[2]
    for name in ("a_rows", "b_rows"):
        bufs[name].fill_(PAD_ROW)
        bufs[name][:, :, :r].copy_(getattr(tables, name))
    bufs["lora_ranks"].copy_(tables.lora_ranks)
    return tables.host_lora_ranks


def _segmented_rows(n: int, num_segments: int, num_adapters: int, g: torch.Generator) -> list[tuple]:
    """Segments of n rows (some empty, neighbours may share an adapter, some without one): the bounds and
    adapters, fixed in number, as a captured graph's buffers keep them."""
    cuts = sorted(torch.randint(0, n + 1, (num_segments - 1,), generator=g).tolist())
    bounds = [0, *cuts, n]
    seg = torch.randint(-1, num_adapters, (num_segments,), generator=g).tolist()
    row_adapter = [a for s, a in enumerate(seg) for _ in range(bounds[s + 1] - bounds[s])]
    return bounds, seg, row_adapter


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_replay_with_new_tables_is_bit_equal_to_eager(ops, monkeypatch, kind):
    """Capture one qkv site once, then replay with other adapters, ranks, row assignments and segment
    bounds copied into the same buffers: bit-equal to eager calls, which match the reference."""
    _use_kind(ops, monkeypatch, kind)
    dims, dtype, n, num_adapters, num_segments = DIMS["small"], torch.bfloat16, 48, 4, 6
    pool, adapters = pool_and_adapters(dtype, "small")
    keys = _keys(dims)
    r_max = max(a.lora_rank for a in adapters)
    i32 = dict(dtype=torch.int32, device="cuda")
    bufs = dict(
        a_rows=torch.empty(len(keys), num_adapters, r_max, **i32),
        b_rows=torch.empty(len(keys), num_adapters, r_max, **i32),
        lora_ranks=torch.empty(len(keys), num_adapters, **i32),
        row_adapter=torch.empty(n, **i32),
        segment_indptr=torch.empty(num_segments + 1, **i32),
        segment_adapters=torch.empty(num_segments, **i32),
        x=torch.empty(n, dims["hidden"], dtype=dtype, device="cuda"),
    )
    h_total = dims["hidden"] + 2 * dims["kv"]
    out_init = torch.randn(n, h_total, generator=_gen("graph")).to(dtype).cuda()
    graph_out = out_init.clone()

    def site(host_ranks, bounds, seg):
        index = {key: k for k, key in enumerate(keys)}
        parts, offset = [], 0
        for m in SITES["qkv"]:
            k, h_out = index[(0, m)], dims[WIDTHS[m][1]]
            host = tuple(host_ranks[k].tolist())
            rows_k = (bufs["a_rows"][k], bufs["b_rows"][k], bufs["lora_ranks"][k])
            parts.append(PoolPart((0, m), pool.view(h_out), *rows_k, host, offset))
            offset += h_out
        rows = StepRows(
            bufs["row_adapter"],
            bufs["segment_indptr"],
            bufs["segment_adapters"],
            tuple(bounds),
            tuple(seg),
            tuple(range(num_adapters)),
            kind != "bgmv",
        )
        return parts, rows

    def load(step, seed):
        g = _gen("graph", kind, seed)
        host_ranks = _fill(bufs, step, keys)
        bounds, seg, row_adapter = _segmented_rows(n, num_segments, num_adapters, g)
        bufs["row_adapter"].copy_(torch.tensor(row_adapter))
        bufs["segment_indptr"].copy_(torch.tensor(bounds))
        bufs["segment_adapters"].copy_(torch.tensor(seg))
        bufs["x"].copy_(torch.randn(n, dims["hidden"], generator=g).to(dtype))
        return site(host_ranks, bounds, seg)

    parts, rows = load(adapters[:num_adapters], "capture")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.lora_site(bufs["x"], pool.view(dims["hidden"]), parts, rows, graph_out.clone())  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.lora_site(bufs["x"], pool.view(dims["hidden"]), parts, rows, graph_out)

    steps = [adapters[3:], adapters[2::-1] + [adapters[6]], [adapters[4]] * 4]  # the last: MLP only
    for seed, step in enumerate(steps):
        parts, rows = load(step, seed)
        graph_out.copy_(out_init)
        graph.replay()
        eager_out = out_init.clone()
        ops.lora_site(bufs["x"], pool.view(dims["hidden"]), parts, rows, eager_out)
        want = out_init.clone()
        run_ref(bufs["x"], pool.view(dims["hidden"]), parts, rows, want)
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager_out), (kind, seed)
        assert_out_matches(eager_out, want, out_init, parts, rows, f"graph {kind} step {seed}")


def test_bad_arguments_name_the_sizes(ops):
    pool, adapters = pool_and_adapters(torch.bfloat16, "small")
    tables = StepTables.build(adapters, _keys(DIMS["small"]), torch.device("cuda"))
    parts = make_parts(pool, tables, "qkv", 0, DIMS["small"])
    rows = make_rows("bgmv", 7, len(adapters), [a.handle for a in adapters], _gen("errors"))
    x = torch.zeros(7, 576, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(7, 576 + 2 * 192, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="x must be a 2-d"):
        ops.lora_site(x.cpu(), pool.view(576), parts, rows, out)
    with pytest.raises(ValueError, match="a_view must be a 2-d torch.float32"):
        ops.lora_site(x.float(), pool.view(576), parts, rows, out)
    with pytest.raises(ValueError, match=r"columns \[576, 768\) are not within out's 700"):
        ops.lora_site(x, pool.view(576), parts[1:], rows, out[:, :700])
    with pytest.raises(ValueError, match=r"rows.row_adapter has shape \(7,\), expected \(6,\)"):
        ops.lora_site(x[:6], pool.view(576), parts, rows, out[:6])
