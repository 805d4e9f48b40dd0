"""The adapter pool's pages (RowAllocator, page_elems_for) and its tensor side (AdapterPool, StepTables).

The allocator runs random seeded alloc/free sequences against a model of what must hold (no row handed
out twice, pages free exactly when empty, pages_needed = pages taken, all-or-nothing, determinism); the
pool is checked element by element (placed rows equal what was written, every other element NaN) and for
its size against the adapters' true sizes at SmolLM2's widths.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from worker.lora.packed import PackedFactors
from worker.lora.pages import FALLBACK_PAGE_ROWS, PoolFullError, RowAllocator, page_elems_for
from worker.lora.pool import PAD_ROW, AdapterPool, ModuleFactors, StepTables

SMOL = dict(hidden=576, kv=192, intermediate=1536, layers=30)
ODD_WIDTHS = (19, 37, 53)  # coprime: their lcm (37259) is forced past a small max_page_elems
GEOMETRIES = {  # name -> (widths, page_elems, num_pages)
    "lcm": ((192, 576, 1536), page_elems_for((192, 576, 1536)), 40),
    "fallback": (ODD_WIDTHS, page_elems_for(ODD_WIDTHS, max_page_elems=1000), 12),
}
RATIO_LIMIT = 1.1


def test_page_elems_is_the_lcm_of_real_model_widths():
    assert page_elems_for((576, 192, 1536)) == 4608  # SmolLM2-135M
    assert page_elems_for((576, 192, 64, 512)) == 4608  # its shares at tp=3
    assert page_elems_for((4096, 1024, 14336)) == 28672  # Llama-3-8B
    assert page_elems_for((64, 32, 150)) == 4800  # the tests' tiny Llama
    assert page_elems_for((576,)) == 576


def test_page_elems_falls_back_past_the_limit():
    widths = (4099, 4097, 2999)  # lcm ~5e10
    page = page_elems_for(widths)
    assert page < math.lcm(*widths)
    assert page == FALLBACK_PAGE_ROWS * 4099 and page % 64 == 0
    assert page_elems_for(ODD_WIDTHS, max_page_elems=1000) == FALLBACK_PAGE_ROWS * 53
    with pytest.raises(ValueError, match="positive"):
        page_elems_for(())
    with pytest.raises(ValueError, match="positive"):
        page_elems_for((64, 0))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rows_tile_each_page_without_straddling(geometry):
    widths, page, num_pages = GEOMETRIES[geometry]
    alloc = RowAllocator(num_pages, page, widths)
    for w in widths:
        assert alloc.num_rows(w) == num_pages * page // w
        end = 0
        for p in range(num_pages):
            rows = alloc.page_rows(p, w)
            assert rows.start >= end and rows.start * w >= p * page and rows.stop * w <= (p + 1) * page
            assert len(rows) >= page // w - 1 >= 1  # at most one row lost per page boundary
            assert all(alloc.page_of(r, w) == p for r in (rows.start, rows.stop - 1))
            end = rows.stop
        assert end <= alloc.num_rows(w)


def test_rejects_a_page_that_some_width_cannot_fill():
    with pytest.raises(ValueError, match="neither divides"):
        RowAllocator(4, 10, (7,))  # page 1 would hold no row of 7
    with pytest.raises(ValueError, match="no row class"):
        RowAllocator(4, 12, (4, 6)).allocate({5: 1})


def test_holes_first_then_lowest_free_page():
    alloc = RowAllocator(5, 4, (2, 4))  # a page: 2 rows of width 2, or 1 row of width 4
    assert alloc.allocate({2: 3}) == {2: [0, 1, 2]}  # pages 0 and 1 (row 3 of page 1 is a hole)
    assert alloc.allocate({4: 1}) == {4: [2]}  # page 2
    assert alloc.allocate({2: 1}) == {2: [3]}  # the hole, not a new page
    assert alloc.free({2: [0]}) == []  # page 0 keeps row 1
    assert alloc.free({2: [1]}) == [0]
    assert alloc.free({2: [2]}) == []
    assert alloc.free_rows(2) == 1 and alloc.free_pages == 3
    assert alloc.allocate({4: 2, 2: 2}) == {2: [2, 0], 4: [3, 4]}  # width 2: hole in page 1, then page 0
    assert alloc.free_pages == 0 and alloc.used_pages == 5


def test_full_pool_raises_and_allocates_nothing():
    alloc = RowAllocator(3, 4, (2, 4))
    alloc.allocate({2: 3})
    with pytest.raises(PoolFullError, match="need 2 new pages, 1 are free") as err:
        alloc.allocate({2: 1, 4: 2})  # the hole takes the width-2 row; width 4 needs 2 pages
    assert (err.value.pages_needed, err.value.free_pages) == (2, 1)
    assert alloc.free_pages == 1 and alloc.free_rows(2) == 1
    assert alloc.allocate({2: 1, 4: 1}) == {2: [3], 4: [2]}


def test_bad_frees_raise_and_free_nothing():
    widths, page, num_pages = GEOMETRIES["fallback"]
    alloc = RowAllocator(num_pages, page, widths)
    rows = alloc.allocate({37: 5, 53: 2})  # page 0 and page 1
    straddling = alloc.page_rows(0, 37).stop  # 37 does not divide the page: this row crosses into page 1
    assert alloc.page_rows(1, 37).start == straddling + 1
    good = {37: rows[37][:2], 53: rows[53][:1]}
    bad = [
        {37: rows[37][:1]},  # twice in one call
        {19: rows[37][:1]},  # a row id of another class
        {37: [straddling]},
        {53: [alloc.num_rows(53)]},
        {37: [-1]},
        {37: [rows[37][-1] + 1]},  # never handed out
        {64: [0]},
    ]
    for b in bad:
        with pytest.raises(ValueError):
            alloc.free({w: good.get(w, []) + b.get(w, []) for w in {*good, *b}})
        assert alloc.used_pages == 2
        assert (alloc.free_rows(37), alloc.free_rows(53)) == (len(alloc.page_rows(0, 37)) - 5, page // 53 - 2)
    assert alloc.free(rows) == [0, 1]
    with pytest.raises(ValueError, match="not in use"):
        alloc.free({37: rows[37][:1]})


def _check_state(alloc: RowAllocator, live: dict[int, set[int]]) -> None:
    """Every live row sits in a page of its class; pages are owned exactly when they hold live rows."""
    pages: dict[int, int] = {}
    for w, rows in live.items():
        for r in rows:
            p = alloc.page_of(r, w)
            assert r in alloc.page_rows(p, w) and alloc.page_width(p) == w
            pages[p] = w
    assert alloc.used_pages == len(pages) == alloc.num_pages - alloc.free_pages
    for p in range(alloc.num_pages):
        assert alloc.page_width(p) == pages.get(p, 0)
    for w in alloc.widths:
        owned = sum(len(alloc.page_rows(p, w)) for p, pw in pages.items() if pw == w)
        assert alloc.free_rows(w) == owned - len(live[w])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_random_alloc_free_sequences(geometry, seed):
    widths, page, num_pages = GEOMETRIES[geometry]
    rng = random.Random(seed)
    alloc, twin = RowAllocator(num_pages, page, widths), RowAllocator(num_pages, page, widths)
    live = {w: set() for w in widths}
    held: list[dict[int, list[int]]] = []
    full = 0
    for _ in range(150):
        if held and rng.random() < 0.45:
            got = held.pop(rng.randrange(len(held)))
            part = {w: set(rng.sample(ids, rng.randint(0, len(ids)))) for w, ids in got.items()}
            rest = {w: [r for r in ids if r not in part[w]] for w, ids in got.items()}
            part = {w: sorted(ids) for w, ids in part.items()}
            before = {alloc.page_of(r, w) for w, ids in part.items() for r in ids}
            emptied = alloc.free(part)
            assert twin.free(part) == emptied
            for w, ids in part.items():
                live[w] -= set(ids)
            still = {alloc.page_of(r, w) for w, ids in live.items() for r in ids}
            assert emptied == sorted(before - still)
            held.append(rest)
        else:
            demand = {
                w: rng.choice([0, 1, 3, 8, 30, 90]) for w in rng.sample(widths, rng.randint(1, len(widths)))
            }
            need, free_before = alloc.pages_needed(demand), alloc.free_pages
            holes = {w: alloc.free_rows(w) for w in widths}
            try:
                got = alloc.allocate(demand)
            except PoolFullError as e:
                assert need > free_before == e.free_pages and e.pages_needed == need
                assert alloc.free_pages == free_before and {w: alloc.free_rows(w) for w in widths} == holes
                with pytest.raises(PoolFullError):
                    twin.allocate(demand)
                full += 1
                continue
            assert twin.allocate(demand) == got
            assert free_before - alloc.free_pages == need
            for w, n in demand.items():
                ids = got.get(w, [])
                assert len(ids) == n == len(set(ids)) and not live[w] & set(ids)
                live[w] |= set(ids)
            held.append(got)
        _check_state(alloc, live)
    assert full > 0, "the sequence never filled the pool"


def _smol_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """module -> (h_in_local, h_out_local) of SmolLM2-135M on one of `tp` ranks (the stacks' rule)."""
    h, kv, inter = SMOL["hidden"], SMOL["kv"], SMOL["intermediate"]
    column = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
    }
    shapes = {m: (i, o // tp) for m, (i, o) in column.items()}
    shapes.update(o_proj=(h // tp, h), down_proj=(inter // tp, h))
    return shapes


MODULE_SETS = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# (rank, module set) of the adapters measured: ranks 4-64 over every module set; then, after every other
# one is released, CHURN_SET is placed into the holes.
ADAPTER_SET = [
    (4, "qv"),
    (8, "attention"),
    (16, "all"),
    (64, "qv"),
    (32, "attention"),
    (4, "all"),
    (12, "qv"),
]
CHURN_SET = [(24, "all"), (5, "attention"), (48, "qv"), (8, "qv"), (64, "attention")]


ZEROS = torch.zeros(64 * 1536, dtype=torch.bfloat16)  # every factor of the ratio test views it


def _zero_factors(rank: int, modules, shapes, layers) -> dict:
    """bfloat16 zeros, all views of one buffer: the ratio test measures bytes; values are tested below."""
    f = {}
    for layer in layers:
        for m in modules:
            a, b_t = (ZEROS[: rank * h].view(rank, h) for h in shapes[m])
            f[layer, m] = ModuleFactors(a, b_t)
    return f


def _true_bytes(sets, size: int) -> int:
    return sum(f.a.numel() + f.b_t.numel() for s in sets for f in s.values()) * size


@pytest.fixture
def single_threaded():
    """Placement runs on the worker's single-threaded loader thread (worker/server.py); on a loaded
    machine an OpenMP team makes each small copy wait for a busy core."""
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(default)


@pytest.mark.parametrize("tp", [1, 3])
def test_pool_bytes_over_true_bytes(tp, single_threaded):
    shapes = _smol_shapes(tp)
    widths = sorted({w for s in shapes.values() for w in s})
    page, layers = page_elems_for(widths), range(SMOL["layers"])
    sets = [_zero_factors(r, MODULE_SETS[s], shapes, layers) for r, s in ADAPTER_SET]
    sets.append(_zero_factors(8, MODULE_SETS["all"], shapes, range(0, SMOL["layers"], 3)))  # some layers
    churn = [_zero_factors(r, MODULE_SETS[s], shapes, layers) for r, s in CHURN_SET]
    true = _true_bytes(sets, 2)
    pool = AdapterPool(_true_bytes(sets + churn, 2) // 2 // page + 16, page, widths, torch.bfloat16, "cpu")
    placed = [pool.place(s) for s in sets]
    assert sum(p.num_elements for p in placed) * 2 == true
    ratio = pool.bytes_used / true
    for p in placed[::2]:
        pool.release(p)
    for s in churn:
        pool.place(s)
    churned = pool.bytes_used / _true_bytes(sets[1::2] + churn, 2)
    print(f"tp={tp} page_elems={page}: pool/true bytes {ratio:.4f}, after churn {churned:.4f}")
    assert ratio <= RATIO_LIMIT and churned <= RATIO_LIMIT


TOY = {"q_proj": (12, 12), "k_proj": (12, 8), "down_proj": (20, 12)}  # module -> (h_in, h_out)
TOY_WIDTHS = (8, 12, 20)  # page: lcm 120 = 15, 10 or 6 rows
TOY_KEYS = tuple((layer, m) for layer in range(3) for m in TOY)


def _toy_pool(num_pages=12, dtype=torch.float32) -> AdapterPool:
    return AdapterPool(num_pages, page_elems_for(TOY_WIDTHS), TOY_WIDTHS, dtype, "cpu", fill_all=True)


def _random_factors(seed: int, ranks: dict) -> dict:
    """(layer, module) -> random float32 factors of rank ranks[key] (a rank per key, like rank_pattern)."""
    g = torch.Generator().manual_seed(seed)
    return {
        key: ModuleFactors(
            torch.randn(r, TOY[key[1]][0], generator=g), torch.randn(r, TOY[key[1]][1], generator=g)
        )
        for key, r in ranks.items()
    }


ADAPTERS = {  # name -> (layer, module) -> rank
    "qk_r3": {(layer, m): 3 for layer in range(3) for m in ("q_proj", "k_proj")},
    "down_r5": {(1, "down_proj"): 5},
    "mixed": {(0, "q_proj"): 2, (0, "down_proj"): 7, (2, "k_proj"): 1, (2, "down_proj"): 4},
}


def _written(pool: AdapterPool, placed) -> torch.Tensor:
    """[storage] bool: the elements of every row the adapters hold."""
    mask = torch.zeros(pool.storage.shape[0], dtype=torch.bool)
    for rows in placed:
        for m in rows.modules.values():
            for ids, w in ((m.a_rows, m.a_width), (m.b_rows, m.b_width)):
                for r in ids.tolist():
                    mask[r * w : (r + 1) * w] = True
    return mask


def _assert_holds(pool: AdapterPool, rows, factors) -> None:
    assert set(rows.modules) == set(factors)
    for key, f in factors.items():
        m = rows.modules[key]
        assert torch.equal(pool.view(m.a_width)[m.a_rows], f.a.to(pool.dtype))
        assert torch.equal(pool.view(m.b_width)[m.b_rows], f.b_t.to(pool.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_placed_rows_hold_the_factors_and_the_rest_is_nan(dtype):
    pool = _toy_pool(dtype=dtype)
    assert pool.storage.isnan().all() and pool.bytes_used == 0
    factors = {name: _random_factors(i, ranks) for i, (name, ranks) in enumerate(ADAPTERS.items())}
    placed = {name: pool.place(f) for name, f in factors.items()}
    for name, f in factors.items():
        _assert_holds(pool, placed[name], f)
    mask = _written(pool, placed.values())
    assert pool.storage[~mask].isnan().all() and not pool.storage[mask].isnan().any()
    assert int(mask.sum()) == sum(p.num_elements for p in placed.values())
    assert pool.bytes_used == pool.allocator.used_pages * 120 * pool.storage.element_size()
    assert pool.bytes_total == 12 * 120 * pool.storage.element_size()


def test_release_refills_nan_and_frees_the_pages():
    pool = _toy_pool()
    fa, fb = _random_factors(0, ADAPTERS["qk_r3"]), _random_factors(1, ADAPTERS["mixed"])
    a, b = pool.place(fa), pool.place(fb)
    used = {p for p in range(pool.allocator.num_pages) if pool.allocator.page_width(p)}
    freed = pool.release(a)
    _assert_holds(pool, b, fb)
    assert pool.storage[~_written(pool, [b])].isnan().all()
    freed += pool.release(b)
    assert pool.storage.isnan().all() and pool.bytes_used == 0
    assert sorted(freed) == sorted(used) and pool.allocator.free_pages == 12


def test_release_twice_or_in_another_pool_raises():
    pool, other = _toy_pool(), _toy_pool()
    f = _random_factors(0, ADAPTERS["down_r5"])
    mine, theirs = pool.place(f), other.place(f)
    assert mine.handle == theirs.handle
    with pytest.raises(ValueError, match="not placed in this pool"):
        pool.release(theirs)
    _assert_holds(pool, mine, f)
    pool.release(mine)
    with pytest.raises(ValueError, match="not placed in this pool"):
        pool.release(mine)


def test_place_is_all_or_nothing():
    pool = _toy_pool(num_pages=2)
    small = pool.place(_random_factors(0, {(0, "q_proj"): 2}))
    before, free = pool.storage.clone(), pool.allocator.free_pages
    with pytest.raises(PoolFullError):
        pool.place(_random_factors(1, {(0, "q_proj"): 9, (0, "k_proj"): 9}))  # 18 rows of 12: 2 pages
    assert torch.equal(pool.storage.isnan(), before.isnan()) and pool.allocator.free_pages == free
    _assert_holds(pool, small, _random_factors(0, {(0, "q_proj"): 2}))
    bad = [
        {(0, "x"): ModuleFactors(torch.zeros(2, 7), torch.zeros(2, 8))},  # no class of width 7
        {(0, "q_proj"): ModuleFactors(torch.zeros(2, 12), torch.zeros(3, 12))},  # ranks differ
        {(0, "q_proj"): ModuleFactors(torch.zeros(0, 12), torch.zeros(0, 12))},
    ]
    for f in bad:
        with pytest.raises(ValueError):
            pool.place(f)
        assert pool.allocator.free_pages == free


def test_step_tables_pad_past_each_rank():
    pool = _toy_pool()
    placed = [pool.place(_random_factors(i, ranks)) for i, ranks in enumerate(ADAPTERS.values())]
    order = [placed[2], placed[0], placed[1]]  # g is the position in the step, not the place order
    t = StepTables.build(order, TOY_KEYS, torch.device("cpu"))
    assert t.a_rows.shape == t.b_rows.shape == (len(TOY_KEYS), 3, 7) and t.lora_ranks.shape == (
        len(TOY_KEYS),
        3,
    )
    assert t.a_rows.dtype == t.lora_ranks.dtype == torch.int32
    for key in TOY_KEYS:
        a_rows, b_rows, ranks = t.for_key(key)
        assert a_rows.is_contiguous() and a_rows.shape == (3, 7)
        for g, ad in enumerate(order):
            m = ad.modules.get(key)
            r = 0 if m is None else m.lora_rank
            assert int(ranks[g]) == int(t.host_lora_ranks[t.index[key], g]) == r
            if m is not None:
                assert (
                    a_rows[g, :r].tolist() == m.a_rows.tolist()
                    and b_rows[g, :r].tolist() == m.b_rows.tolist()
                )
            assert (a_rows[g, r:] == PAD_ROW).all() and (b_rows[g, r:] == PAD_ROW).all()
    assert order[0].host_table(TOY_KEYS) is order[0].host_table(TOY_KEYS)  # built once per adapter
    empty = StepTables.build([], TOY_KEYS, torch.device("cpu"))
    assert empty.a_rows.shape == (len(TOY_KEYS), 0, 0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_pool_fills_each_page_with_nan_when_first_handed_out():
    """Without fill_all, a page is NaN-filled the first time it gets rows: every page ever handed out
    is NaN except the rows placed in it, after placing and after releasing."""
    pool = AdapterPool(12, page_elems_for(TOY_WIDTHS), TOY_WIDTHS, torch.float32, "cpu")
    assert pool.filled_pages() == [] and pool.bytes_used == 0
    factors = {name: _random_factors(i, ranks) for i, (name, ranks) in enumerate(ADAPTERS.items())}
    placed = {name: pool.place(f) for name, f in factors.items()}
    used = [p for p in range(12) if pool.allocator.page_width(p)]
    assert pool.filled_pages() == used and len(used) < 12
    pages = torch.zeros(pool.storage.shape[0], dtype=torch.bool)
    for p in used:
        pages[p * 120 : (p + 1) * 120] = True
    mask = _written(pool, placed.values())
    assert pool.storage[pages & ~mask].isnan().all() and not pool.storage[mask].isnan().any()
    for name, f in factors.items():
        _assert_holds(pool, placed[name], f)
        pool.release(placed[name])
    assert pool.storage[pages].isnan().all() and pool.filled_pages() == used


def test_an_unused_pool_takes_no_resident_memory():
    """A 512 MiB pool costs its pages only as adapters take them (ADAPTER_MEMORY is a bound, not an
    allocation, on the CPU)."""
    widths = (576, 192, 1536)
    page = page_elems_for(widths)
    before = _resident_bytes()
    pool = AdapterPool((512 << 20) // (page * 4), page, widths, torch.float32, "cpu")
    assert _resident_bytes() - before < (16 << 20)
    f = {(0, "q_proj"): ModuleFactors(torch.randn(8, 576), torch.randn(8, 576))}
    rows = pool.place(f)
    assert _resident_bytes() - before < (16 << 20) + pool.bytes_used
    assert torch.equal(pool.view(576)[rows.modules[0, "q_proj"].a_rows], f[0, "q_proj"].a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_read_gives_back_what_place_was_given_packed(dtype):
    """place from packed blocks (one scatter per width), read back (one gather per width), place again
    elsewhere: the same factors each time, in the pool dtype."""
    pool = _toy_pool(dtype=dtype)
    f = _random_factors(3, ADAPTERS["mixed"])
    packed = PackedFactors.pack(f, dtype)
    assert set(packed.blocks) == {8, 12, 20} and packed.nbytes == sum(
        (x.a.numel() + x.b_t.numel()) * packed.blocks[8].element_size() for x in f.values()
    )
    filler = pool.place(_random_factors(4, ADAPTERS["qk_r3"]))
    first = pool.place(packed)
    _assert_holds(pool, first, f)
    back = pool.read(first)
    assert back.places == packed.places
    for w in packed.blocks:
        assert torch.equal(back.blocks[w], packed.blocks[w])
    pool.release(filler)
    _assert_holds(pool, pool.place(back), f)
