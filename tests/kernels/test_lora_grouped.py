"""The CPU ops' paths and caches over the pool: which path a batch takes, and that cached copies are
never served for other content (a released adapter, a new adapter in its rows, another pool).

Each case also checks the result against `reference.lora_site_ref` (`check_site`), and a released
adapter's rows and the tables' padding are made NaN wherever the spec does not read, so a stale or
over-long read shows as NaN, a wrong result or an IndexError.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.kernels.test_lora_ops import (
    ADAPTERS,
    ALL,
    SITES,
    check_site,
    factors,
    fragmented_pool,
    h_in,
    place,
    row_pattern,
    seed,
    site_parts,
    step_rows,
)
from worker.kernels.torch_copies import CopyCache
from worker.kernels.torch_ops import TorchLoraOps
from worker.kernels.torch_plan import lora_rank_bucket
from worker.lora.pool import PAD_ROW

# pattern -> (grouped path?, in place?) for the q/k/v site over ADAPTERS.
PATHS = {
    "decode_sorted": (True, False),  # rows without adapter and uneven lengths: gathered
    "decode_one_each": (True, True),
    "decode_equal": (True, True),
    "decode_ragged": (True, False),
    "repeated": (True, False),
    "prefill": (False, None),
    "prefill_short": (True, False),
    "bgmv_random": (True, False),
    "bgmv_runs": (True, False),
    "bgmv_long": (False, None),
}


def _setup(name: str, *args):
    g = seed(name, *args)
    pool = fragmented_pool(g)
    return g, pool, place(pool, g)


@pytest.mark.parametrize("pattern", PATHS)
def test_path_taken(pattern):
    g, pool, placed = _setup("path", pattern)
    ops = TorchLoraOps()
    parts = site_parts(pool, placed, "qkv")
    row_adapter, use_segments = row_pattern(pattern, g)
    rows = step_rows(row_adapter, placed, use_segments)
    check_site(ops, pool, parts, rows, row_adapter, "qkv", torch.bfloat16, g)
    plan = ops._plan(rows)
    shape = plan.site(parts)
    grouped, in_place = PATHS[pattern]
    assert (shape.buckets is not None) == grouped
    assert (plan.order is not None) == (pattern in ("bgmv_random", "bgmv_long"))
    if grouped:
        assert (shape.layout.start is not None) == in_place
        assert len(ops.cache) == len(shape.buckets)  # one entry per bucket
    if pattern == "decode_ragged":  # adapter 5's single rows and its 16 rows: split by length
        assert len(shape.buckets) > len({b.part_ranks for b in shape.buckets})


def test_buckets_hold_equal_part_ranks():
    g, pool, placed = _setup("buckets")
    ops = TorchLoraOps()
    parts = site_parts(pool, placed, "qkv")
    row_adapter, _ = row_pattern("decode_one_each", g)
    shape = ops._plan(step_rows(row_adapter, placed, True)).site(parts)
    # q/k/v ranks of ADAPTERS: bucket per part (0 = untargeted); adapters 1 (q/v) and 5 (all) of rank 8
    # differ in k, so they do not share a bucket.
    got = {b.part_ranks: sorted(shape.groups[i][2] for i in b.members) for b in shape.buckets}
    assert got == {
        (1, 1, 1): [0],
        (8, 0, 8): [1],
        (24, 24, 24): [2],
        (0, 4, 0): [3],
        (48, 48, 48): [4],
        (8, 8, 8): [5],
    }


def test_copies_are_cached_across_steps():
    g, pool, placed = _setup("steps")
    ops = TorchLoraOps()
    parts = {s: site_parts(pool, placed, s) for s in SITES}
    row_adapter, _ = row_pattern("decode_sorted", g)
    entries = 0
    for step in range(3):  # a new StepRows each step, as the runner builds them
        rows = step_rows(row_adapter, placed, True)
        for s in SITES:
            check_site(ops, pool, parts[s], rows, row_adapter, s, torch.float32, g)
        entries = entries or len(ops.cache)
        assert ops.cache.misses == entries, f"step {step} rebuilt copies"
    # Other row counts of the same adapters, in the same order, reuse the copies.
    row_adapter, _ = row_pattern("decode_one_each", g)
    rows = step_rows(row_adapter, placed, True)
    check_site(ops, pool, parts["qkv"], rows, row_adapter, "qkv", torch.float32, g)
    assert ops.cache.misses == entries


def test_a_joining_adapter_rebuilds_only_its_bucket():
    g, pool, placed = _setup("join")
    ops = TorchLoraOps()
    row_adapter, _ = row_pattern("decode_one_each", g)
    check_site(
        ops,
        pool,
        site_parts(pool, placed, "qkv"),
        step_rows(row_adapter, placed, True),
        row_adapter,
        "qkv",
        torch.float32,
        g,
    )
    misses = ops.cache.misses
    placed.append(pool.place(factors(g, ADAPTERS[2][0], ADAPTERS[2][1])))  # g = 6, adapter 2's bucket
    row_adapter = [*row_adapter[:3], 6, *row_adapter[3:]]
    rows = step_rows(row_adapter, placed, True)
    check_site(ops, pool, site_parts(pool, placed, "qkv"), rows, row_adapter, "qkv", torch.float32, g)
    assert ops.cache.misses == misses + 1


@pytest.mark.parametrize("pattern", ["decode_equal", "prefill"])
def test_new_adapter_in_released_rows_is_not_served_stale_copies(pattern):
    """Adapter 2 is released and another of the same rank and modules placed, partly in its rows: a step
    with the same rows and ranks must read the new adapter (its handle differs), not the cached copies."""
    g, pool, placed = _setup("stale", pattern)
    ops = TorchLoraOps()
    row_adapter, use_segments = row_pattern(pattern, g)
    check_site(
        ops,
        pool,
        site_parts(pool, placed, "qkv"),
        step_rows(row_adapter, placed, use_segments),
        row_adapter,
        "qkv",
        torch.float32,
        g,
    )
    old_rows = placed[2].rows_by_width()
    pool.release(placed[2])
    placed[2] = pool.place(factors(g, ADAPTERS[2][0], ADAPTERS[2][1]))
    new_rows = placed[2].rows_by_width()
    assert all(set(new_rows[w]) & set(old_rows[w]) for w in old_rows), "expected the released rows reused"
    misses = ops.cache.misses
    rows = step_rows(row_adapter, placed, use_segments)
    check_site(ops, pool, site_parts(pool, placed, "qkv"), rows, row_adapter, "qkv", torch.float32, g)
    assert ops.cache.misses > misses


@pytest.mark.parametrize("pattern", ["decode_sorted", "decode_equal", "prefill", "bgmv_random"])
def test_released_rows_and_padding_are_never_read(pattern):
    """The step's adapters sit among released adapters' rows (NaN), and every table entry past a rank
    names a NaN row instead of PAD_ROW: the output stays finite and equal to the spec's."""
    g, pool, placed = _setup("nan", pattern)
    for extra in place(pool, g, [(16, ALL), (2, ALL)]):
        pool.release(extra)
    assert pool.storage.isnan().any()
    ops = TorchLoraOps()
    row_adapter, use_segments = row_pattern(pattern, g)
    rows = step_rows(row_adapter, placed, use_segments)
    for site in SITES:
        parts = []
        for p in site_parts(pool, placed, site):
            a_nan_row = int(pool.view(h_in(SITES[site][0])).isnan().all(1).nonzero()[0, 0])
            b_nan_row = int(p.b_view.isnan().all(1).nonzero()[0, 0])
            parts.append(
                replace(
                    p,
                    a_rows=p.a_rows.masked_fill(p.a_rows == PAD_ROW, a_nan_row),
                    b_rows=p.b_rows.masked_fill(p.b_rows == PAD_ROW, b_nan_row),
                )
            )
        check_site(ops, pool, parts, rows, row_adapter, site, torch.bfloat16, g, calls=2)


def test_two_pools_do_not_share_copies():
    """Handles restart at 1 in every pool: one ops object over two pools must keep their copies apart."""
    ops = TorchLoraOps()
    row_adapter, _ = row_pattern("decode_equal", seed("pools"))
    misses = []
    for i in range(2):  # the same adapters' shapes, handles and rows, other values
        g, pool, placed = _setup("pools", i)
        rows = step_rows(row_adapter, placed, True)
        check_site(ops, pool, site_parts(pool, placed, "qkv"), rows, row_adapter, "qkv", torch.float32, g)
        misses.append(ops.cache.misses)
    assert misses[1] == 2 * misses[0]


@pytest.mark.parametrize("cache_bytes", [0, 30_000])
def test_small_cache_budget(cache_bytes):
    """No budget (or one for a few sites): copies are rebuilt as needed, results unchanged."""
    g, pool, placed = _setup("budget", cache_bytes)
    ops = TorchLoraOps(cache_bytes=cache_bytes)
    row_adapter, _ = row_pattern("decode_sorted", g)
    rows = step_rows(row_adapter, placed, True)
    for _ in range(2):
        for s in SITES:
            check_site(ops, pool, site_parts(pool, placed, s), rows, row_adapter, s, torch.float32, g)
    assert ops.cache.nbytes <= cache_bytes
    assert (len(ops.cache) == 0) == (cache_bytes == 0)


def _entry(n: int):
    return [(torch.zeros(n // 4), ())], n


def test_copy_cache_keeps_recent_entries_when_full():
    """A sweep over more sites than fit keeps the first ones (plain LRU would keep none); entries no
    longer used are evicted for new ones."""
    cache = CopyCache(max_bytes=300)
    sites = [("site", i) for i in range(4)]
    for _ in range(3):  # three steps over 4 sites of 100 bytes: 3 fit
        for s in sites:
            cache.begin(s)
            if cache.get(s, "batch1") is None:
                cache.put(s, "batch1", *_entry(100), holds=())
    assert cache.misses == 3 + 1 + 1 + 1 and len(cache) == 3 and cache.nbytes == 300
    for _ in range(3):  # the batch changes: the old entries age out and the new ones take their place
        for s in sites[:2]:
            cache.begin(s)
            if cache.get(s, "batch2") is None:
                cache.put(s, "batch2", *_entry(100), holds=())
    assert cache.get(sites[0], "batch2") is not None and cache.get(sites[1], "batch2") is not None
    assert cache.nbytes <= 300
    left = [key for key in cache._entries if key[1] == "batch1"]
    assert left, "a batch1 entry should be left to age out"
    for _ in range(8 * len(sites) // 2):  # entries unused for about 8 steps are dropped, budget or not
        for s in sites[:2]:
            cache.begin(s)
            assert cache.get(s, "batch2") is not None
    assert all(key not in cache._entries for key in left)
    assert len(cache) == 2 and cache.nbytes == 200


def test_lora_rank_bucket():
    expected = {
        1: 1,
        2: 2,
        3: 3,
        4: 4,
        5: 6,
        6: 6,
        7: 8,
        8: 8,
        9: 12,
        12: 12,
        13: 16,
        17: 24,
        20: 24,
        33: 48,
        64: 64,
    }
    assert {r: lora_rank_bucket(r) for r in expected} == expected
    for r in range(1, 200):
        assert r <= lora_rank_bucket(r) < 1.5 * r or r <= 2
