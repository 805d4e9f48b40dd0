"""The fused sgmv (shrink + expand in one call) of the CPU path against `sgmv_lora_ref`.

Decode-like batches (many short segments) take the grouped path: padded segments, two bmm, weight
copies cached across calls; the rest falls back to one matmul per segment. Both must equal the spec,
and the cache must never serve weights that changed or belong to another batch.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_lora_ops import (
    DTYPES,
    H_IN,
    H_OUT,
    MAX_LORA_RANK,
    OFFSET,
    OUT_PAD,
    OUT_TOL,
    RANKS,
    SEGMENT_PATTERNS,
    _out,
    _row_ranks_sgmv,
    _seed,
    _segments,
    _stack,
    _x,
)
from worker.kernels.reference import sgmv_lora_ref
from worker.kernels.torch_grouped import lora_rank_bucket
from worker.kernels.torch_ops import TorchLoraOps


def _decode_segments(pattern: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot-sorted short segments, one per slot, as the runner builds for decode."""
    if pattern == "equal":  # every adapter slot the same number of rows
        lengths, slots = [n // 4] * 4, [1, 2, 3, 4]
    elif pattern == "ragged":  # unequal lengths (padding) after a long no-adapter segment
        lengths, slots = [n - 8, 1, 3, 2, 2], [0, 1, 2, 3, 4]
    elif pattern == "repeated_slot":  # the same slot in two segments
        third = n // 3
        lengths, slots = [third, third, n - 2 * third], [1, 3, 1]
    else:
        raise AssertionError(pattern)
    indptr = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return indptr, torch.tensor(slots, dtype=torch.int32)


def _run(ops, dtype, n, indptr, seg_slots, g, a=None, b=None, ranks=RANKS):
    lora_ranks = torch.tensor(ranks, dtype=torch.int32)
    a = _stack(g, H_IN, H_IN**-0.5) if a is None else a
    b = _stack(g, H_OUT, 1.0) if b is None else b
    x = _x(g, n, H_IN, dtype)
    out = _out(g, n, H_OUT + OUT_PAD, dtype)
    out_before, out_ref = out.clone(), out.clone()
    y = torch.empty(n, MAX_LORA_RANK)
    ops.sgmv_lora(x, a, b, indptr, seg_slots, lora_ranks, y, out, OFFSET)
    sgmv_lora_ref(x, a, b, indptr, seg_slots, lora_ranks, out_ref, OFFSET)
    row_ranks = _row_ranks_sgmv(indptr, seg_slots)
    touched = torch.zeros_like(out, dtype=torch.bool)
    touched[row_ranks > 0, OFFSET : OFFSET + H_OUT] = True
    assert torch.equal(out[~touched], out_before[~touched]), "out changed where untouched"
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=rtol, atol=atol)
    return a, b


@pytest.mark.parametrize("pattern", ["equal", "ragged", "repeated_slot"])
@pytest.mark.parametrize("n", [12, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_path_matches_ref(dtype, n, pattern):
    ops = TorchLoraOps()
    indptr, seg_slots = _decode_segments(pattern, n)
    plan = ops.grouped.plan(indptr, seg_slots, n)
    buckets = ops.grouped.buckets(plan, RANKS)
    assert buckets is not None, "this case must exercise the grouped path"
    in_place = plan.layout(buckets, torch.device("cpu")).start is not None
    assert in_place == (pattern == "equal" or (pattern == "repeated_slot" and n % 3 == 0))
    g = _seed("grouped", dtype, n, pattern)
    a, b = _run(ops, dtype, n, indptr, seg_slots, g)
    _run(ops, dtype, n, indptr, seg_slots, g, a, b)  # second call: plan and weight copies from the cache


@pytest.mark.parametrize("pattern", SEGMENT_PATTERNS)
@pytest.mark.parametrize("n", [1, 3, 7, 133])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_segments_match_ref(dtype, n, pattern):
    """Whichever path the plan picks (grouped or per segment), the result is the spec's."""
    g = _seed("sgmv_lora", dtype, n, pattern)
    indptr, seg_slots = _segments(pattern, n, g)
    _run(TorchLoraOps(), dtype, n, indptr, seg_slots, g)


def test_long_or_few_segments_fall_back_to_per_segment_matmuls():
    ops = TorchLoraOps()
    few = ops.grouped.plan(torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([1, 2]), 8)
    long = ops.grouped.plan(torch.tensor([0, 100, 200, 300]), torch.tensor([1, 2, 3]), 300)
    ragged = ops.grouped.plan(torch.tensor([0, 1, 2, 40]), torch.tensor([1, 2, 3]), 40)
    for plan in (few, long):
        assert ops.grouped.buckets(plan, RANKS) is None
    # Padding is to the longest segment of each rank bucket: ragged segments of one rank fall back ...
    assert ops.grouped.buckets(ragged, [0, 8, 8, 8, 8]) is None
    # ... while the same segments at three ranks (three buckets of one segment each) pad nothing.
    buckets = ops.grouped.buckets(ragged, RANKS)
    assert [len(members) for members, _ in buckets] == [1, 1, 1]
    assert ragged.layout(buckets, torch.device("cpu")).shapes == ((1, 1), (1, 1), (1, 38))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_buckets_pad_to_their_own_longest_segment(dtype):
    """Two rank buckets with segments of different lengths: each pads to its own longest, gathered."""
    ops, n = TorchLoraOps(), 20
    indptr = torch.tensor([0, 2, 5, 9, 15, 20], dtype=torch.int32)  # lengths 2, 3, 4, 6, 5
    seg_slots = torch.tensor([1, 1, 1, 3, 3], dtype=torch.int32)  # ranks 4, 4, 4, then 16, 16
    plan = ops.grouped.plan(indptr, seg_slots, n)
    buckets = ops.grouped.buckets(plan, RANKS)
    layout = plan.layout(buckets, torch.device("cpu"))
    assert layout.shapes == ((3, 4), (2, 6)) and layout.start is None and layout.total == 24
    g = _seed("own-longest", dtype)
    a, b = _run(ops, dtype, n, indptr, seg_slots, g)
    _run(ops, dtype, n, indptr, seg_slots, g, a, b)


def test_cache_follows_changed_weights_and_batches():
    """A stack written in place (an adapter loaded) and a batch with other slots are never served stale."""
    ops, n, dtype = TorchLoraOps(), 12, torch.float32
    indptr, seg_slots = _decode_segments("equal", n)
    g = _seed("cache")
    a, b = _run(ops, dtype, n, indptr, seg_slots, g)
    a[2, :8].mul_(-3.0)  # slot 2 (rank 8) gets other weights, as a load would write them
    b[3, :16].add_(1.0)
    _run(ops, dtype, n, indptr, seg_slots, g, a, b)
    other = torch.tensor([4, 3, 2, 1], dtype=torch.int32)  # same segments, other slots
    _run(ops, dtype, n, indptr, other, g, a, b)
    a2, b2 = a.clone(), b.clone()  # same contents, other tensors: a miss, not a wrong hit
    a2[1, :4] = 0.5
    _run(ops, dtype, n, indptr, other, g, a2, b2)


def test_memo_follows_changed_ranks():
    """The host-side choices kept per plan (buckets, slot lists, delta views) follow a slot whose rank
    changed under the same segments, as when an adapter of another rank is loaded into it."""
    ops, n = TorchLoraOps(), 12
    indptr, seg_slots = _decode_segments("equal", n)
    g = _seed("ranks")
    a, b = _run(ops, torch.float32, n, indptr, seg_slots, g)
    # Only lower ranks: the stacks hold NaN past each slot's rank in RANKS (nothing there may be read).
    for ranks in ([0, 4, 2, 16, 64], [0, 4, 8, 0, 64], [0, 3, 6, 12, 48]):
        _run(ops, torch.float32, n, indptr, seg_slots, g, a, b, ranks=ranks)
    plans = list(ops.grouped._plans.values())
    assert len(plans) == 1 and len(plans[0].memo) > 3  # one plan served them all


def test_plans_of_a_join_step_are_both_kept():
    """A join step applies its prompt rows and its decode rows in turn in every layer: both plans are
    kept (the same objects come back), and the oldest goes once more segmentations than kept arrive."""
    ops = TorchLoraOps()
    prompt = (torch.tensor([0, 40], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 40)
    decode = (torch.tensor([0, 2, 4, 6], dtype=torch.int32), torch.tensor([1, 2, 3], dtype=torch.int32), 6)
    first = ops.grouped.plan(*prompt), ops.grouped.plan(*decode)
    assert first[0] is not first[1]
    again = ops.grouped.plan(*prompt), ops.grouped.plan(*decode)
    assert again[0] is first[0] and again[1] is first[1]
    for n in range(7, 7 + 4):  # four other segmentations push the first two out
        ops.grouped.plan(torch.tensor([0, n], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), n)
    assert ops.grouped.plan(*prompt) is not first[0]


def test_cache_is_bounded():
    ops, n = TorchLoraOps(), 12
    ops.grouped.cache_bytes = 0  # nothing fits: every call gathers afresh, results still exact
    indptr, seg_slots = _decode_segments("equal", n)
    g = _seed("bounded")
    a, b = _run(ops, torch.float32, n, indptr, seg_slots, g)
    a[1, :4].mul_(2.0)
    _run(ops, torch.float32, n, indptr, seg_slots, g, a, b)
    assert ops.grouped._cached_bytes == 0


def test_rejects_bad_segments_and_ranks():
    ops, n = TorchLoraOps(), 12
    g = _seed("reject")
    a, b = _stack(g, H_IN, 1.0), _stack(g, H_OUT, 1.0)
    x, out, y = torch.zeros(n, H_IN), torch.zeros(n, H_OUT), torch.zeros(n, MAX_LORA_RANK)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    indptr, seg_slots = _decode_segments("equal", n)
    with pytest.raises(ValueError, match="segment_indptr"):
        ops.sgmv_lora(x, a, b, torch.tensor([0, 5, 3, 9, 12]), seg_slots, ranks, y, out)
    with pytest.raises(ValueError, match="slot ids range"):
        ops.sgmv_lora(x, a, b, indptr, seg_slots + 4, ranks, y, out)
    with pytest.raises(ValueError, match="lora_ranks"):
        ops.sgmv_lora(x, a, b, indptr, seg_slots, ranks[:-1], y, out)
    with pytest.raises(ValueError, match="lora_ranks"):
        ops.sgmv_lora(x, a, b, indptr, seg_slots, torch.tensor([0, 4, 8, 16, 65]), y, out)


def test_rank_buckets_clamped_to_stack_rows():
    """Ranks round up to a power of two or 1.5 times one, never past the stack's rows."""
    expected = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 7: 8, 8: 8, 9: 12, 13: 16, 24: 24, 25: 32, 48: 48, 97: 128}
    assert {r: lora_rank_bucket(r) for r in expected} == expected
    ops, n, rows = TorchLoraOps(), 10, 20  # ranks 17 and 20 both bucket to 24, past the 20 rows
    g = _seed("clamp")
    ranks = torch.tensor([0, 3, 20, 12, 17], dtype=torch.int32)
    a = torch.randn(5, rows, H_IN, generator=g) * H_IN**-0.5
    b = torch.randn(5, rows, H_OUT, generator=g)
    for s, r in enumerate(ranks.tolist()):
        a[s, r:], b[s, r:] = float("nan"), float("nan")
    indptr = torch.tensor([0, 2, 5, 7, 8, 10], dtype=torch.int32)
    seg_slots = torch.tensor([1, 2, 3, 0, 4], dtype=torch.int32)
    assert ops.grouped.buckets(ops.grouped.plan(indptr, seg_slots, n), ranks.tolist()) is not None
    x, out = _x(g, n, H_IN, torch.float32), _out(g, n, H_OUT, torch.float32)
    out_ref = out.clone()
    ops.sgmv_lora(x, a, b, indptr, seg_slots, ranks, torch.empty(n, rows), out)
    sgmv_lora_ref(x, a, b, indptr, seg_slots, ranks, out_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
