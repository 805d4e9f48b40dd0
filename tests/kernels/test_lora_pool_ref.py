"""lora_pool_ref (the LoRA op over the adapter pool) against a dense computation from the adapters' own
matrices, never through the pool.

The pool is fragmented before the adapters under test are placed (fillers placed, some released), so
their rows are scattered among other adapters' live rows and NaN holes; every table entry past a rank is
PAD_ROW, which no gather accepts. Reading a row the spec does not name therefore changes the result,
makes it NaN or raises.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch

from worker.kernels.reference import lora_pool_ref
from worker.lora.pages import page_elems_for
from worker.lora.pool import PAD_ROW, AdapterPool, ModuleFactors, StepTables

H_IN = 45
H_OUT = {"q_proj": 27, "k_proj": 15}  # odd widths; 27 does not divide the fallback page (a tail)
WIDTHS = (H_IN, *H_OUT.values())
PAGES = {"lcm": page_elems_for(WIDTHS), "fallback": page_elems_for(WIDTHS, max_page_elems=100)}
KEYS = [(0, m) for m in H_OUT]
# Which modules each of the G = 4 adapters targets: rows of an adapter without the module are skipped.
TARGETS = [("q_proj", "k_proj"), ("q_proj",), ("k_proj",), ("q_proj", "k_proj")]
RANK_SETS = {"mixed": [4, 8, 16, 64], "equal": [8, 8, 8, 8], "tiny": [1, 3, 2, 5]}
OUT_PAD, OFFSET = 11, 6  # out is [N, h_out + OUT_PAD]; the op writes columns [OFFSET, OFFSET + h_out)
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _adapter(g: torch.Generator, rank: int, modules) -> dict:
    """module -> (A [r, h_in], B [h_out, r], scale) float32, as peft stores them."""
    return {
        m: (
            torch.randn(rank, H_IN, generator=g) / H_IN**0.5,
            torch.randn(H_OUT[m], rank, generator=g),
            2.0 / rank,
        )
        for m in modules
    }


def _factors(adapter: dict, dtype: torch.dtype) -> dict:
    """What the pool is given: A and B^T with the scale folded in, rounded to the pool dtype."""
    return {(0, m): ModuleFactors(a.to(dtype), (b * s).T.to(dtype)) for m, (a, b, s) in adapter.items()}


def _dense(x, adapters, row_adapter, out, module, dtype) -> torch.Tensor:
    """The expected out: each row plus x @ W.T with the adapter's merged W = scale * B @ A, in float64
    from the same rounded factors the pool holds."""
    expected = out.clone()
    for i, g in enumerate(row_adapter.tolist()):
        if g < 0 or module not in adapters[g]:
            continue
        a, b, s = adapters[g][module]
        w = (b * s).T.to(dtype).double().T @ a.to(dtype).double()  # [h_out, h_in]
        dst = expected[i, OFFSET : OFFSET + H_OUT[module]]
        dst.copy_((dst.double() + x[i].double() @ w.T).to(dtype))
    return expected


def _fragmented_pool(page: str, dtype: torch.dtype, g: torch.Generator) -> AdapterPool:
    """A pool whose holes the next adapters fill: three fillers placed, the first and last released."""
    pool = AdapterPool(160, PAGES[page], WIDTHS, dtype, "cpu", fill_all=True)
    fillers = [pool.place(_factors(_adapter(g, r, H_OUT), dtype)) for r in (5, 9, 6)]
    pool.release(fillers[0])
    pool.release(fillers[2])
    return pool


def _row_adapter(g: torch.Generator, n: int) -> torch.Tensor:
    """[n] int32 in [-1, G): random, about a third without an adapter, the first row always without."""
    ids = torch.randint(0, len(TARGETS), (n,), generator=g)
    ids[torch.rand(n, generator=g) < 0.3] = -1
    ids[0] = -1
    return ids.to(torch.int32)


def _run(pool, tables, module, x, row_adapter, out) -> torch.Tensor:
    out = out.clone()
    a_rows, b_rows, ranks = tables.for_key((0, module))
    lora_pool_ref(
        x, pool.view(H_IN), pool.view(H_OUT[module]), row_adapter, a_rows, b_rows, ranks, out, OFFSET
    )
    return out


def _inputs(g, n, module, dtype):
    x = torch.randn(n, H_IN, generator=g).to(dtype)
    out = torch.randn(n, H_OUT[module] + OUT_PAD, generator=g).to(dtype)
    return x, out


@pytest.mark.parametrize("module", H_OUT)
@pytest.mark.parametrize("n", [1, 5, 33])
@pytest.mark.parametrize("ranks", RANK_SETS)
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("dtype", OUT_TOL, ids=str)
def test_matches_dense(dtype, page, ranks, n, module):
    g = _gen(dtype, page, ranks, n, module)
    pool = _fragmented_pool(page, dtype, g)
    adapters = [_adapter(g, r, t) for r, t in zip(RANK_SETS[ranks], TARGETS, strict=True)]
    tables = StepTables.build([pool.place(_factors(a, dtype)) for a in adapters], KEYS, torch.device("cpu"))
    x, out = _inputs(g, n, module, dtype)
    row_adapter = _row_adapter(g, n)
    got = _run(pool, tables, module, x, row_adapter, out)
    expected = _dense(x, adapters, row_adapter, out, module, dtype)
    touched = torch.zeros_like(out, dtype=torch.bool)
    rows = [i for i, a in enumerate(row_adapter.tolist()) if a >= 0 and module in adapters[a]]
    touched[rows, OFFSET : OFFSET + H_OUT[module]] = True
    assert torch.equal(got[~touched], out[~touched]), "out changed where no adapter applies"
    torch.testing.assert_close(got.float(), expected.float(), rtol=OUT_TOL[dtype][0], atol=OUT_TOL[dtype][1])


@pytest.mark.parametrize("page", PAGES)
def test_reading_freed_rows_gives_nan(page):
    g = _gen("freed", page)
    pool = _fragmented_pool(page, torch.float32, g)
    stale = pool.place(_factors(_adapter(g, 16, H_OUT), torch.float32))
    tables = StepTables.build([stale], KEYS, torch.device("cpu"))
    pool.release(stale)
    x, out = _inputs(g, 5, "q_proj", torch.float32)
    row_adapter = torch.tensor([0, -1, 0, 0, -1], dtype=torch.int32)
    got = _run(pool, tables, "q_proj", x, row_adapter, out)
    assert got[row_adapter >= 0, OFFSET : OFFSET + H_OUT["q_proj"]].isnan().all()
    assert torch.equal(got[row_adapter < 0], out[row_adapter < 0])


@pytest.mark.parametrize("page", PAGES)
def test_rows_reused_after_release_read_only_the_new_rank(page):
    """Y (rank 8) is placed in pages X (rank 64) held and released: nothing of X is left, Y's output is
    finite and dense Y's, and stays so when Y's padding names NaN rows (the rank bounds every read)."""
    g = _gen("reuse", page)
    pool = AdapterPool(80, PAGES[page], WIDTHS, torch.float32, "cpu", fill_all=True)
    x_rows = pool.place(_factors(_adapter(g, 64, H_OUT), torch.float32))
    x_pages = {p for p in range(80) if pool.allocator.page_width(p)}
    pool.release(x_rows)
    assert pool.storage.isnan().all()
    y = _adapter(g, 8, H_OUT)
    y_rows = pool.place(_factors(y, torch.float32))
    assert {p for p in range(80) if pool.allocator.page_width(p)} <= x_pages
    assert int((~pool.storage.isnan()).sum()) == y_rows.num_elements
    tables = StepTables.build([y_rows], KEYS, torch.device("cpu"))
    x, out = _inputs(g, 6, "q_proj", torch.float32)
    row_adapter = torch.tensor([0, 0, -1, 0, -1, 0], dtype=torch.int32)
    expected = _dense(x, [y], row_adapter, out, "q_proj", torch.float32)
    got = _run(pool, tables, "q_proj", x, row_adapter, out)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def pad_with_nan_rows(t: torch.Tensor, w: int) -> torch.Tensor:
        nan_rows = pool.view(w).isnan().all(1).nonzero()[:8, 0].to(torch.int32)  # [8]
        return torch.cat([t, nan_rows.expand(t.shape[0], t.shape[1], 8)], 2)  # [K, G, R_max + 8]

    a_rows, b_rows = pad_with_nan_rows(tables.a_rows, H_IN), pad_with_nan_rows(tables.b_rows, H_OUT["q_proj"])
    got = _run(pool, replace(tables, a_rows=a_rows, b_rows=b_rows), "q_proj", x, row_adapter, out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_pad_entry_cannot_be_gathered():
    pool = AdapterPool(2, PAGES["lcm"], WIDTHS, torch.float32, "cpu", fill_all=True)
    with pytest.raises(IndexError):
        pool.view(H_IN)[torch.tensor([PAD_ROW], dtype=torch.int32).long()]
