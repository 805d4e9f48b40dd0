"""NativeCpuLoraOps.lora_site (`csrc/lora_cpu.cpp`) against `reference.lora_site_ref`.

Pools are built as in `test_lora_ops.py`: real (`AdapterPool`, NaN in every unused row and page) and
fragmented before the adapters under test are placed, so their rows lie among other adapters' live rows
and NaN holes; table entries past a rank are PAD_ROW. The pool is in the model dtype (the native rule)
and, once, float32 under a bf16 model. Adapters mix ranks 1, odd ones, 64 and 96, and module sets; some
rows have no adapter. Row layouts: decode (grouped, interleaved, one row each), prefill segments, a
prompt-plus-decode (join) batch, repeated segments. Sizes: the small odd widths of `test_lora_ops.py`
and SmolLM2-like ones past the vector blocks, with tails (h not a multiple of 16). Skipped where the
extension cannot be built; haswell (AVX2 only) and skylake-avx512 (no avx512_bf16) builds run a subset
where this CPU can run them, so an AVX-512 machine checks the code an AVX2-only one runs.
"""

from __future__ import annotations

import logging
import shutil
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from worker.kernels import cpu_native, select_lora_ops
from worker.kernels.cpu_native import NativeCpuLoraOps
from worker.kernels.pool_args import PoolPart, StepRows
from worker.kernels.reference import lora_site_ref
from worker.kernels.torch_ops import TorchLoraOps
from worker.lora.pages import page_elems_for
from worker.lora.pool import AdapterPool, ModuleFactors, StepTables

LAYER = 2
SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "down": ("down_proj",)}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
OFFSET, OUT_PAD = 5, 7  # out is [T, OFFSET + site width + OUT_PAD]; the site writes from column OFFSET
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 out may differ by one rounding of a differently ordered float32 sum.
OUT_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


@dataclass(frozen=True)
class Shape:
    h_in: int  # q/k/v and o read it
    h_down: int  # down reads it
    q: int
    kv: int

    def width(self, module: str) -> int:
        return {"q_proj": self.q, "k_proj": self.kv, "v_proj": self.kv}.get(module, self.h_in)

    def reads(self, module: str) -> int:
        return self.h_down if module == "down_proj" else self.h_in

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted({self.h_in, self.h_down, self.q, self.kv}))


SHAPES = {"small": Shape(40, 56, 24, 12), "smol": Shape(200, 520, 200, 72)}  # 200 = 12 * 16 + 8
# The G = 6 adapters of a step: (rank, modules); ranks 1, odd, 64 and past it, partial module sets.
ADAPTERS = [
    (1, ALL),
    (7, ("q_proj", "v_proj")),
    (64, ALL),
    (3, ("k_proj", "down_proj")),
    (96, ALL),
    (17, ALL),
]


def seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def factors(shape: Shape, g: torch.Generator, rank: int, modules) -> dict:
    """(layer, module) -> ModuleFactors(a [r, h_in], b_t [r, h_out]) float32."""
    return {
        (LAYER, m): ModuleFactors(
            torch.randn(rank, shape.reads(m), generator=g) * shape.reads(m) ** -0.5,
            torch.randn(rank, shape.width(m), generator=g) * rank**-0.5,
        )
        for m in modules
    }


def placed_pool(shape: Shape, dtype: torch.dtype, g: torch.Generator, adapters=ADAPTERS):
    """A fragmented pool of `dtype` (fillers placed, two released) and the adapters placed into it."""
    need = sum(r * (shape.reads(m) + shape.width(m)) for r, ms in [*adapters, (20, ALL)] for m in ms)
    page = page_elems_for(shape.widths)
    pool = AdapterPool(2 * need // page + 40, page, shape.widths, dtype, "cpu", fill_all=True)
    fillers = [pool.place(factors(shape, g, r, ALL)) for r in (5, 9, 6)]
    pool.release(fillers[0])
    pool.release(fillers[2])
    return pool, [pool.place(factors(shape, g, r, modules)) for r, modules in adapters]


def site_parts(shape: Shape, pool: AdapterPool, placed: list, site: str) -> list[PoolPart]:
    """The site's PoolParts as the runner builds them: a part no adapter targets is left out."""
    tables = StepTables.build(placed, [(LAYER, m) for m in ALL], torch.device("cpu"))
    parts, column = [], OFFSET
    for m in SITES[site]:
        a_rows, b_rows, ranks = tables.for_key((LAYER, m))
        host = tuple(tables.host_lora_ranks[tables.index[(LAYER, m)]].tolist())
        if any(host):
            parts.append(PoolPart((LAYER, m), pool.view(shape.width(m)), a_rows, b_rows, ranks, host, column))
        column += shape.width(m)
    return parts


def row_pattern(name: str, g: torch.Generator) -> tuple[list[int], bool]:
    """(g of each row, use_segments)."""
    if name == "decode_grouped":  # a few rows per adapter, some without
        return [-1, -1, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5], True
    if name == "decode_one_each":
        return list(range(6)), True
    if name == "decode_interleaved":  # bgmv: any order
        return torch.randint(-1, 6, (37,), generator=g).tolist(), False
    if name == "decode_one_row":
        return [4], False
    if name == "prefill":  # long segments
        return [2] * 70 + [-1] * 5 + [4] * 66 + [1] * 3, True
    if name == "join":  # prompts, then decode rows of several adapters
        return [5] * 21 + [0] * 9 + [2, -1, 4, 4, 5, 3, 0, 1], True
    if name == "repeated":  # one adapter in several segments
        return [2, 2, 4, 4, 4, 2, -1, 0, 2], True
    if name == "no_adapter":
        return [-1] * 6, True
    raise AssertionError(name)


PATTERNS = [
    "decode_grouped",
    "decode_one_each",
    "decode_interleaved",
    "decode_one_row",
    "prefill",
    "join",
    "repeated",
    "no_adapter",
]


def check_site(ops, shape, pool, parts, rows, row_adapter, site, dtype, g):
    """Two calls (the second takes the ops' cached argument lists), each on a copy of a random out,
    compared with the spec; entries the spec leaves alone stay bit-equal."""
    n, h_in = len(row_adapter), shape.reads(SITES[site][0])
    x = torch.randn(n, h_in, generator=g).to(dtype)
    width = sum(shape.width(m) for m in SITES[site])
    before = torch.randn(n, OFFSET + width + OUT_PAD, generator=g).to(dtype)
    expected = before.clone()
    a_view = pool.view(h_in)
    lora_site_ref(x, a_view, parts, rows, expected)
    touched = torch.zeros_like(before, dtype=torch.bool)
    for p in parts:
        hit = [i for i, a in enumerate(row_adapter) if a >= 0 and p.host_lora_ranks[a]]
        touched[hit, p.out_offset : p.out_offset + p.h_out] = True
    rtol, atol = OUT_TOL[dtype]
    for _ in range(2):
        out = before.clone()
        ops.lora_site(x, a_view, parts, rows, out)
        assert torch.equal(out[~touched], before[~touched]), "out changed where no adapter applies"
        assert out.isfinite().all(), "NaN from an unused row or page"
        torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def native():
    module = cpu_native.load_native()
    if module is None:
        pytest.skip("the native CPU kernel cannot be built here (see the log)")
    return NativeCpuLoraOps(module)


# Other builds this CPU can run, and the flags they need: haswell is AVX2 without AVX-512 (what AMD EPYC
# dev/CI machines before Zen 4 run), skylake-avx512 is AVX-512 without avx512_bf16 (its widening shrink).
VARIANTS = {"haswell": ("avx2", "fma", "f16c"), "skylake-avx512": ("avx512f", "avx512bw", "avx512vl")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """The extension built with -march=<variant> (cached like the native build)."""
    flags = cpu_native.cpu_flags().split()
    if not all(f in flags for f in VARIANTS[request.param]) or cpu_native.load_native() is None:
        pytest.skip(f"this CPU cannot run a {request.param} build, or there is no compiler")
    return NativeCpuLoraOps(cpu_native.build(request.param))


def _run(ops, dtype, shape_name, site, pattern, pool_dtype=None):
    shape = SHAPES[shape_name]
    g = seed(dtype, shape_name, site, pattern, pool_dtype)
    pool, placed = placed_pool(shape, pool_dtype or ops.pool_dtype(dtype), g)
    parts = tuple(site_parts(shape, pool, placed, site))  # a tuple, as the runner passes
    row_adapter, use_segments = row_pattern(pattern, g)
    rows = StepRows.build(row_adapter, tuple(p.handle for p in placed), use_segments, torch.device("cpu"))
    check_site(ops, shape, pool, parts, rows, row_adapter, site, dtype, g)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_site_matches_ref(native, dtype, shape_name, site, pattern):
    _run(native, dtype, shape_name, site, pattern)


@pytest.mark.parametrize("pattern", ["decode_grouped", "prefill", "join"])
def test_float32_pool_under_bf16_model(native, pattern):
    _run(native, torch.bfloat16, "smol", "qkv", pattern, pool_dtype=torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", ["decode_interleaved", "prefill", "join"])
def test_threads(native, threads, pattern):
    """Calls large enough to fork (the prefill ones) give the same results on 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run(native, torch.bfloat16, "smol", "qkv", pattern)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pattern", ["decode_grouped", "decode_interleaved", "prefill", "join"])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_builds_match_ref(variant, dtype, site, pattern):
    _run(variant, dtype, "smol", site, pattern)


def test_strided_rows(native):
    """x and out as row slices of wider tensors (a join step's views), and out with strided columns."""
    shape, g = SHAPES["smol"], seed("strided")
    pool, placed = placed_pool(shape, torch.bfloat16, g)
    parts = site_parts(shape, pool, placed, "o")
    row_adapter = [0, 2, -1, 4, 5]
    rows = StepRows.build(row_adapter, tuple(p.handle for p in placed), False, torch.device("cpu"))
    x = torch.randn(5, 2 * shape.h_in, generator=g).bfloat16()[:, : shape.h_in]
    wide = torch.randn(5, 2 * (OFFSET + shape.h_in), generator=g).bfloat16()
    for out in (wide[:, : OFFSET + shape.h_in], wide[:, ::2]):
        expected = out.clone()
        lora_site_ref(x, pool.view(shape.h_in), parts, rows, expected)
        native.lora_site(x, pool.view(shape.h_in), parts, rows, out)
        torch.testing.assert_close(out.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


def test_rejects_bad_arguments(native):
    shape, g = SHAPES["small"], seed("bad")
    pool, placed = placed_pool(shape, torch.float32, g)
    parts = site_parts(shape, pool, placed, "qkv")
    rows = StepRows.build([0, 1, 2], tuple(p.handle for p in placed), True, torch.device("cpu"))
    width = OFFSET + sum(shape.width(m) for m in SITES["qkv"])

    def call(parts=parts, rows=rows, x=None, out=None, a_view=None):
        x = torch.zeros(rows.num_rows, shape.h_in) if x is None else x
        out = torch.zeros(rows.num_rows, width) if out is None else out
        native.lora_site(x, pool.view(shape.h_in) if a_view is None else a_view, parts, rows, out)

    bad_ids = parts[0].a_rows.clone()
    bad_ids[1, 0] = pool.view(shape.h_in).shape[0]  # one past the last row
    cases = [
        ("x: need", dict(x=torch.zeros(4, shape.h_in))),
        ("x: need", dict(x=torch.zeros(3, shape.h_in, dtype=torch.int32))),
        ("out", dict(out=torch.zeros(2, width))),
        ("out", dict(out=torch.zeros(3, width - 1))),
        ("out", dict(out=torch.zeros(3, width, dtype=torch.bfloat16))),
        ("a_view", dict(a_view=pool.view(shape.h_down))),
        (r"parts\[1\].b_view", dict(parts=[parts[0], replace(parts[1], b_view=parts[1].b_view.double())])),
        (r"parts\[0\].a_rows", dict(parts=[replace(parts[0], a_rows=parts[0].a_rows[:-1])])),
        (r"parts\[0\]: adapter 1 rank row 0", dict(parts=[replace(parts[0], a_rows=bad_ids)])),
        (
            r"parts\[2\].lora_ranks",
            dict(parts=[*parts[:2], replace(parts[2], lora_ranks=parts[2].lora_ranks + 97)]),
        ),
        ("overlap", dict(parts=[parts[0], replace(parts[1], out_offset=parts[0].out_offset + 1)])),
        (
            "rows: adapter indices",
            dict(rows=StepRows.build([0, 6, 1], rows.adapters, True, torch.device("cpu"))),
        ),
        (
            "rows: adapter indices",
            dict(rows=StepRows.build([0, -2, 1], rows.adapters, False, torch.device("cpu"))),
        ),
    ]
    for match, kwargs in cases:
        with pytest.raises(ValueError, match=match):
            call(**kwargs)


def test_selection_uses_native_when_a_compiler_is_present():
    """With a compiler and ninja present, the kernel builds and the CPU ops in use are the native ones
    (not skipped on a failed build: that fails here); the torch path when told so."""
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    if shutil.which(get_cxx_compiler()) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja: the torch path serves")
    ops = select_lora_ops(torch.device("cpu"))
    assert isinstance(ops, NativeCpuLoraOps)
    assert ops.decode_uses_segments is False
    assert [ops.pool_dtype(d) for d in DTYPES] == DTYPES
    assert ops.row_order([3, 0, 5, 3, 0], {3: 16, 5: 8}) == [1, 4, 0, 3, 2]
    assert isinstance(select_lora_ops(torch.device("cpu"), native_cpu=False), TorchLoraOps)


def test_failed_build_falls_back_and_logs_once(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_native, "build", no_compiler)
    cpu_native.load_native.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_native.__name__):
            assert isinstance(select_lora_ops(torch.device("cpu")), TorchLoraOps)
            assert isinstance(select_lora_ops(torch.device("cpu")), TorchLoraOps)
        assert [r.getMessage().count("no compiler here") for r in caplog.records] == [1]
    finally:
        cpu_native.load_native.cache_clear()


def test_cache_key_depends_on_cpu_and_flags(monkeypatch):
    key = cpu_native.build_key("native")
    assert cpu_native.build_key("haswell") != key
    monkeypatch.setattr(cpu_native, "cpu_flags", lambda: "fpu sse2 avx2 fma")
    assert cpu_native.build_key("native") != key


def test_cache_key_depends_on_the_shared_header(monkeypatch, tmp_path):
    for name in ("lora_cpu.cpp", "cpu_vectors.h"):
        (tmp_path / name).write_bytes((cpu_native.CSRC / name).read_bytes())
    monkeypatch.setattr(cpu_native, "CSRC", tmp_path)
    key = cpu_native.build_key("native")
    with open(tmp_path / "cpu_vectors.h", "a") as header:
        header.write("// edited\n")
    assert cpu_native.build_key("native") != key
