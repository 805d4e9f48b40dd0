"""TorchLoraOps.lora_site (the fast CPU path over the adapter pool) against `reference.lora_site_ref`.

The pool is real (`AdapterPool`) and fragmented before the adapters under test are placed (fillers
placed, then some released), so their rows lie among other adapters' live rows and NaN holes; every
table entry past a rank is PAD_ROW, which no gather accepts. The adapters mix ranks (1 to 33) and module
sets (q/v only, k/down only, all), and some rows have no adapter: reading a row the spec does not name
changes the result, makes it NaN or raises. Three sites: q/k/v (three parts), o and down (one part each).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from worker.kernels import select_lora_ops
from worker.kernels.pool_args import PoolPart, StepRows
from worker.kernels.reference import lora_site_ref
from worker.kernels.torch_ops import TorchLoraOps
from worker.lora.pages import page_elems_for
from worker.lora.pool import AdapterPool, ModuleFactors, StepTables

H_IN, H_DOWN = 40, 56  # the q/k/v and o sites read H_IN, down reads H_DOWN
WIDTH = {"q_proj": 24, "k_proj": 12, "v_proj": 12, "o_proj": H_IN, "down_proj": H_IN}
SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "down": ("down_proj",)}
WIDTHS = (H_IN, H_DOWN, 24, 12)
LAYER = 3
OFFSET, OUT_PAD = 5, 7  # out is [T, OFFSET + site width + OUT_PAD]; the site writes from column OFFSET
ALL = tuple(WIDTH)
# The G = 6 adapters of a step: (rank, modules). Rank 1, ranks past 16 and 32, partial module sets.
ADAPTERS = [(1, ALL), (8, ("q_proj", "v_proj")), (20, ALL), (4, ("k_proj", "down_proj")), (33, ALL), (8, ALL)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 out may differ by one rounding of a differently ordered float32 sum.
OUT_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def seed(*parts) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def h_in(module: str) -> int:
    return H_DOWN if module == "down_proj" else H_IN


def factors(g: torch.Generator, rank: int, modules, layer: int = LAYER) -> dict:
    """(layer, module) -> ModuleFactors(a [r, h_in], b_t [r, h_out]) float32."""
    return {
        (layer, m): ModuleFactors(
            torch.randn(rank, h_in(m), generator=g) * h_in(m) ** -0.5,
            torch.randn(rank, WIDTH[m], generator=g),
        )
        for m in modules
    }


def fragmented_pool(g: torch.Generator, pages: int = 60) -> AdapterPool:
    """A pool whose holes the next adapters fill: three fillers placed, the first and last released."""
    pool = AdapterPool(pages, page_elems_for(WIDTHS), WIDTHS, torch.float32, "cpu", fill_all=True)
    fillers = [pool.place(factors(g, r, ALL)) for r in (5, 9, 6)]
    pool.release(fillers[0])
    pool.release(fillers[2])
    return pool


def place(pool: AdapterPool, g: torch.Generator, adapters=ADAPTERS) -> list:
    return [pool.place(factors(g, r, modules)) for r, modules in adapters]


def site_parts(pool: AdapterPool, placed: list, site: str, keep_untargeted: bool = False) -> list[PoolPart]:
    """The site's PoolParts over the step tables of `placed`, as the runner builds them: a part no
    adapter targets is left out (unless keep_untargeted)."""
    keys = [(LAYER, m) for m in ALL]
    tables = StepTables.build(placed, keys, torch.device("cpu"))
    parts, column = [], OFFSET
    for m in SITES[site]:
        a_rows, b_rows, ranks = tables.for_key((LAYER, m))
        host = tuple(tables.host_lora_ranks[tables.index[(LAYER, m)]].tolist())
        if any(host) or keep_untargeted:
            parts.append(PoolPart((LAYER, m), pool.view(WIDTH[m]), a_rows, b_rows, ranks, host, column))
        column += WIDTH[m]
    return parts


def site_width(site: str) -> int:
    return sum(WIDTH[m] for m in SITES[site])


def step_rows(row_adapter: list[int], placed: list, use_segments: bool) -> StepRows:
    return StepRows.build(row_adapter, tuple(p.handle for p in placed), use_segments, torch.device("cpu"))


def by_rank(lengths: dict[int, int]) -> list[int]:
    """Rows for adapters g -> count, laid out as TorchLoraOps.row_order does (by rank, then g)."""
    order = sorted(lengths, key=lambda g: (ADAPTERS[g][0] if g >= 0 else 0, g))
    return [g for g in order for _ in range(lengths[g])]


def row_pattern(name: str, g: torch.Generator) -> tuple[list[int], bool]:
    """(g of each row, use_segments)."""
    if name == "decode_sorted":  # a few rows per adapter, grouped and ordered by rank, some without
        return by_rank({-1: 2, 0: 1, 1: 3, 2: 2, 3: 1, 4: 3, 5: 2}), True
    if name == "decode_one_each":
        return by_rank(dict.fromkeys(range(6), 1)), True
    if name == "decode_equal":  # equal contiguous segments: the grouped path reads x and out in place
        return by_rank(dict.fromkeys(range(6), 4)), True
    if name == "decode_ragged":  # adapter 5's segments too uneven for one bucket: split by length
        return [5, 0, 0, 0, 5, 2, 2, 5, -1] + [5] * 16 + [1, 1], True
    if name == "repeated":  # one adapter in two segments
        return [2, 2, 4, 4, 4, 2, -1, 0], True
    if name == "prefill":  # long segments: one matmul per segment and part
        return [2] * 70 + [-1] * 5 + [4] * 66 + [1] * 3, True
    if name == "prefill_short":  # short prompts: grouped
        return [0] * 20 + [3] * 17 + [4] * 20, True
    if name == "bgmv_random":  # interleaved adapters, per-row: sorted on the host, scattered back
        ids = torch.randint(-1, len(ADAPTERS), (37,), generator=g)
        return ids.tolist(), False
    if name == "bgmv_runs":  # per-row but already in few runs: computed in place
        return [1, 1, 4, 4, 4, -1, 0, 0], False
    if name == "bgmv_long":  # per-row and interleaved, long groups after sorting
        ids = torch.tensor([2, 4]).repeat(70)
        return ids.tolist(), False
    if name == "no_adapter":
        return [-1] * 6, True
    raise AssertionError(name)


PATTERNS = [
    "decode_sorted",
    "decode_one_each",
    "decode_equal",
    "decode_ragged",
    "repeated",
    "prefill",
    "prefill_short",
    "bgmv_random",
    "bgmv_runs",
    "bgmv_long",
    "no_adapter",
]


def touched_mask(out: torch.Tensor, row_adapter: list[int], parts: list[PoolPart]) -> torch.Tensor:
    mask = torch.zeros_like(out, dtype=torch.bool)
    for p in parts:
        rows = [i for i, a in enumerate(row_adapter) if a >= 0 and p.host_lora_ranks[a]]
        mask[rows, p.out_offset : p.out_offset + p.h_out] = True
    return mask


def check_site(ops, pool, parts, rows, row_adapter, site, dtype, g, calls: int = 1):
    """Run the op `calls` times on fresh copies of one out and compare each with the spec; returns out."""
    n = len(row_adapter)
    x = torch.randn(n, h_in(SITES[site][0]), generator=g).to(dtype)
    before = torch.randn(n, OFFSET + site_width(site) + OUT_PAD, generator=g).to(dtype)
    expected = before.clone()
    a_view = pool.view(h_in(SITES[site][0]))
    lora_site_ref(x, a_view, parts, rows, expected)
    touched = touched_mask(before, row_adapter, parts)
    rtol, atol = OUT_TOL[dtype]
    for _ in range(calls):
        out = before.clone()
        ops.lora_site(x, a_view, parts, rows, out)
        assert torch.equal(out[~touched], before[~touched]), "out changed where no adapter applies"
        assert out.isfinite().all()
        torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_site_matches_ref(dtype, site, pattern):
    g = seed(dtype, site, pattern)
    pool = fragmented_pool(g)
    placed = place(pool, g)
    parts = site_parts(pool, placed, site)
    row_adapter, use_segments = row_pattern(pattern, g)
    rows = step_rows(row_adapter, placed, use_segments)
    # Twice: the second call reads the cached copies and plans.
    check_site(TorchLoraOps(), pool, parts, rows, row_adapter, site, dtype, g, calls=2)


@pytest.mark.parametrize("pattern", ["decode_sorted", "prefill", "bgmv_random"])
def test_untargeted_part_is_skipped(pattern):
    """A part passed although no adapter of the step targets it (ranks all 0) writes nothing."""
    g = seed("untargeted", pattern)
    pool = fragmented_pool(g)
    placed = place(pool, g, [(8, ("q_proj", "v_proj")), (3, ("q_proj",)), (16, ("v_proj",))])
    parts = site_parts(pool, placed, "qkv", keep_untargeted=True)
    assert [p.key[1] for p in parts] == ["q_proj", "k_proj", "v_proj"] and not any(parts[1].host_lora_ranks)
    row_adapter, use_segments = row_pattern(pattern, g)
    row_adapter = [a % 3 if a >= 0 else -1 for a in row_adapter]
    check_site(
        TorchLoraOps(),
        pool,
        parts,
        step_rows(row_adapter, placed, use_segments),
        row_adapter,
        "qkv",
        torch.bfloat16,
        g,
    )


def test_empty_and_no_parts_change_nothing():
    g = seed("empty")
    pool = fragmented_pool(g)
    placed = place(pool, g)
    ops = TorchLoraOps()
    parts = site_parts(pool, placed, "qkv")
    for row_adapter, ps in (([], parts), ([0, 1, 2], [])):
        n = len(row_adapter)
        out = torch.ones(n, site_width("qkv") + OFFSET)
        ops.lora_site(torch.ones(n, H_IN), pool.view(H_IN), ps, step_rows(row_adapter, placed, True), out)
        assert torch.equal(out, torch.ones_like(out))


def test_protocol_and_selection():
    ops = select_lora_ops(torch.device("cpu"), native_cpu=False)  # the native path: test_lora_cpu_native
    assert isinstance(ops, TorchLoraOps)
    assert ops.decode_uses_segments is True
    for dtype in DTYPES:
        assert ops.pool_dtype(dtype) == torch.float32


def test_row_order_groups_adapters_by_rank():
    ops = TorchLoraOps()
    adapters = [3, 0, 5, 3, 7, 0, 5, 9]  # slots; 0 = no adapter
    ranks = {3: 16, 5: 8, 7: 8, 9: 64}
    order = ops.row_order(adapters, ranks)
    assert sorted(order) == list(range(len(adapters)))
    assert [adapters[i] for i in order] == [0, 0, 5, 5, 7, 3, 3, 9]
    assert order[:2] == [1, 5] and order[2:4] == [2, 6]  # stable within a slot


def _bad_call(ops, pool, parts, rows, x=None, out=None, a_view=None):
    n = rows.num_rows
    x = torch.zeros(n, H_IN) if x is None else x
    out = torch.zeros(n, OFFSET + site_width("qkv")) if out is None else out
    ops.lora_site(x, pool.view(H_IN) if a_view is None else a_view, parts, rows, out)


def test_rejects_bad_arguments():
    from dataclasses import replace

    g = seed("bad")
    pool = fragmented_pool(g)
    placed = place(pool, g)
    parts = site_parts(pool, placed, "qkv")
    rows = step_rows([0, 1, 2], placed, True)
    ops = TorchLoraOps()
    with pytest.raises(ValueError, match="x"):
        _bad_call(ops, pool, parts, rows, x=torch.zeros(4, H_IN))
    with pytest.raises(ValueError, match="x"):
        _bad_call(ops, pool, parts, rows, x=torch.zeros(3, H_IN, dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        _bad_call(ops, pool, parts, rows, out=torch.zeros(2, 60))
    with pytest.raises(ValueError, match="out"):  # too narrow for the parts' columns
        _bad_call(ops, pool, parts, rows, out=torch.zeros(3, OFFSET + site_width("qkv") - 1))
    with pytest.raises(ValueError, match="a_view"):
        _bad_call(ops, pool, parts, rows, a_view=pool.view(H_IN).bfloat16())
    with pytest.raises(ValueError, match="a_view"):
        _bad_call(ops, pool, parts, rows, a_view=pool.view(H_DOWN))
    with pytest.raises(ValueError, match=r"parts\[1\].b_view"):
        _bad_call(ops, pool, [parts[0], replace(parts[1], b_view=parts[1].b_view.double())], rows)
    with pytest.raises(ValueError, match=r"parts\[0\]"):  # tables of G - 1 adapters
        _bad_call(ops, pool, [replace(parts[0], a_rows=parts[0].a_rows[:-1])], rows)
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        _bad_call(ops, pool, [replace(parts[0], host_lora_ranks=parts[0].host_lora_ranks[:-1])], rows)
    with pytest.raises(ValueError, match=r"parts\[2\]: host_lora_ranks"):  # rank past R_max
        bad = replace(parts[2], host_lora_ranks=(parts[2].a_rows.shape[1] + 1,) * len(placed))
        _bad_call(ops, pool, [*parts[:2], bad], rows)
    with pytest.raises(ValueError, match="overlap"):
        _bad_call(ops, pool, [parts[0], replace(parts[1], out_offset=parts[0].out_offset + 1)], rows)
    with pytest.raises(ValueError, match="rows: adapter indices"):
        _bad_call(ops, pool, parts, step_rows([0, 6, 1], placed, True))
    with pytest.raises(ValueError, match="rows: adapter indices"):
        _bad_call(ops, pool, parts, step_rows([0, -2, 1], placed, False))
    with pytest.raises(ValueError, match="rows: host_indptr"):
        _bad_call(ops, pool, parts, replace(rows, host_indptr=(0, 2, 1, 3)))
