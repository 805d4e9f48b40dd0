"""TorchLoraOps (the fast CPU path) against the reference loops, and the reference against a dense einsum.

Every stack holds NaN in the rows past a slot's rank (and in all of a rank-0 slot), and y holds NaN past
each row's rank before expand, so reading anything the spec says is unused poisons the result.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from worker.kernels import select_lora_ops
from worker.kernels.reference import bgmv_expand_ref, bgmv_shrink_ref, sgmv_expand_ref, sgmv_shrink_ref
from worker.kernels.torch_ops import TorchLoraOps

RANKS = [0, 4, 8, 16, 64]  # slot 0 has no adapter; ranks differ per slot within one stack
MAX_LORA_RANK = 64
H_IN, H_OUT = 48, 80
OUT_PAD = 23  # out is wider than h_out: columns [OFFSET, OFFSET + h_out) of [N, h_out + OUT_PAD]
OFFSET = 17
SENTINEL = -777.0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for `out` in the model dtype: bf16/fp16 may differ by one rounding of a differently
# ordered fp32 sum. y is float32 from identical fp32 inputs whatever the model dtype.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
Y_TOL = (1e-5, 1e-5)
BATCH_SIZES = [1, 3, 7, 133]
SLOT_PATTERNS = ["distinct", "identical", "zipf", "with_none", "sorted"]
SEGMENT_PATTERNS = ["single", "singletons", "mixed", "sorted_decode"]

ops = TorchLoraOps()


def _seed(*parts) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _stack(g: torch.Generator, h: int, scale: float) -> torch.Tensor:
    """[num_slots, MAX_LORA_RANK, h] float32 with NaN in every row a slot's rank does not cover."""
    stack = torch.randn(len(RANKS), MAX_LORA_RANK, h, generator=g) * scale
    for s, r in enumerate(RANKS):
        stack[s, r:] = float("nan")
    return stack


def _slot_ids(pattern: str, n: int, g: torch.Generator) -> torch.Tensor:
    """[n] int32 slot of each row."""
    adapters = len(RANKS) - 1  # slots 1..4 have an adapter
    if pattern == "distinct":  # every slot once in turn (all distinct while n <= 4)
        ids = torch.arange(n) % adapters + 1
    elif pattern == "identical":
        ids = torch.full((n,), 3)
    elif pattern in ("zipf", "sorted"):
        weights = 1.0 / torch.arange(1, len(RANKS) + 1, dtype=torch.float64) ** 1.5
        ids = torch.randperm(len(RANKS), generator=g)[torch.multinomial(weights, n, True, generator=g)]
        if pattern == "sorted":
            ids = ids.sort().values
    elif pattern == "with_none":  # about a third of the rows have no adapter
        ids = torch.randint(1, len(RANKS), (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.35] = 0
    else:
        raise AssertionError(pattern)
    return ids.to(torch.int32)


def _segments(pattern: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_indptr [num_segments + 1] int32, segment_slot_ids [num_segments] int32) covering n rows."""
    if pattern == "single":
        lengths, slots = [n], [2]
    elif pattern == "singletons":
        lengths, slots = [1] * n, [i % len(RANKS) for i in range(n)]
    elif pattern == "mixed":  # lengths 0 and 1 always present, slots random including no adapter
        cuts = sorted(torch.randint(1, n + 1, (3,), generator=g).tolist())
        lengths = [0, 1, *(q - p for p, q in zip([1, *cuts], [*cuts, n], strict=True)), 0]
        slots = torch.randint(0, len(RANKS), (len(lengths),), generator=g).tolist()
    elif pattern == "sorted_decode":  # what the runner builds for decode: slot-sorted rows, one run each
        ids = _slot_ids("sorted", n, g)
        slot_t, counts = torch.unique_consecutive(ids, return_counts=True)
        lengths, slots = counts.tolist(), slot_t.tolist()
    else:
        raise AssertionError(pattern)
    indptr = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    assert int(indptr[-1]) == n
    return indptr, torch.tensor(slots, dtype=torch.int32)


def _row_ranks_bgmv(slot_ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor(RANKS)[slot_ids.long()]


def _row_ranks_sgmv(indptr: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
    """[num_tokens] rank of each row's segment slot."""
    counts = indptr[1:].long() - indptr[:-1].long()
    return torch.tensor(RANKS)[seg_slots.long()].repeat_interleave(counts)


def _y_input(g: torch.Generator, row_ranks: torch.Tensor) -> torch.Tensor:
    """[n, MAX_LORA_RANK] float32 expand input, NaN past each row's rank."""
    y = torch.randn(row_ranks.shape[0], MAX_LORA_RANK, generator=g)
    y[torch.arange(MAX_LORA_RANK) >= row_ranks[:, None]] = float("nan")
    return y


def _check_shrink(y: torch.Tensor, y_ref: torch.Tensor, row_ranks: torch.Tensor) -> None:
    written = torch.arange(MAX_LORA_RANK) < row_ranks[:, None]  # [n, MAX_LORA_RANK]
    assert torch.equal(y[~written], torch.full_like(y[~written], SENTINEL)), "y changed where untouched"
    torch.testing.assert_close(y[written], y_ref[written], rtol=Y_TOL[0], atol=Y_TOL[1])


def _check_expand(out, out_ref, out_before, row_ranks, h_out, offset, dtype) -> None:
    touched = torch.zeros_like(out, dtype=torch.bool)
    touched[row_ranks > 0, offset : offset + h_out] = True
    assert torch.equal(out[~touched], out_before[~touched]), "out changed where untouched"
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=rtol, atol=atol)


def _x(g: torch.Generator, n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, h, generator=g).to(dtype)


def _out(g: torch.Generator, n: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, width, generator=g).to(dtype)


@pytest.mark.parametrize("pattern", SLOT_PATTERNS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bgmv_shrink_matches_ref(dtype, n, pattern):
    g = _seed("bgmv_shrink", dtype, n, pattern)
    a = _stack(g, H_IN, H_IN**-0.5)
    slot_ids, lora_ranks = _slot_ids(pattern, n, g), torch.tensor(RANKS, dtype=torch.int32)
    x = _x(g, n, H_IN, dtype)
    y, y_ref = torch.full((n, MAX_LORA_RANK), SENTINEL), torch.full((n, MAX_LORA_RANK), SENTINEL)
    ops.bgmv_shrink(x, a, slot_ids, lora_ranks, y)
    bgmv_shrink_ref(x, a, slot_ids, lora_ranks, y_ref)
    _check_shrink(y, y_ref, _row_ranks_bgmv(slot_ids))


@pytest.mark.parametrize("pattern", SLOT_PATTERNS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bgmv_expand_matches_ref(dtype, n, pattern):
    g = _seed("bgmv_expand", dtype, n, pattern)
    b = _stack(g, H_OUT, 1.0)
    slot_ids, lora_ranks = _slot_ids(pattern, n, g), torch.tensor(RANKS, dtype=torch.int32)
    row_ranks = _row_ranks_bgmv(slot_ids)
    y = _y_input(g, row_ranks)
    out = _out(g, n, H_OUT + OUT_PAD, dtype)
    out_before, out_ref = out.clone(), out.clone()
    ops.bgmv_expand(y, b, slot_ids, lora_ranks, out, OFFSET)
    bgmv_expand_ref(y, b, slot_ids, lora_ranks, out_ref, OFFSET)
    _check_expand(out, out_ref, out_before, row_ranks, H_OUT, OFFSET, dtype)


@pytest.mark.parametrize("pattern", SEGMENT_PATTERNS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgmv_shrink_matches_ref(dtype, n, pattern):
    g = _seed("sgmv_shrink", dtype, n, pattern)
    a = _stack(g, H_IN, H_IN**-0.5)
    indptr, seg_slots = _segments(pattern, n, g)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    x = _x(g, n, H_IN, dtype)
    y, y_ref = torch.full((n, MAX_LORA_RANK), SENTINEL), torch.full((n, MAX_LORA_RANK), SENTINEL)
    ops.sgmv_shrink(x, a, indptr, seg_slots, lora_ranks, y)
    sgmv_shrink_ref(x, a, indptr, seg_slots, lora_ranks, y_ref)
    _check_shrink(y, y_ref, _row_ranks_sgmv(indptr, seg_slots))


@pytest.mark.parametrize("pattern", SEGMENT_PATTERNS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgmv_expand_matches_ref(dtype, n, pattern):
    g = _seed("sgmv_expand", dtype, n, pattern)
    b = _stack(g, H_OUT, 1.0)
    indptr, seg_slots = _segments(pattern, n, g)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    row_ranks = _row_ranks_sgmv(indptr, seg_slots)
    y = _y_input(g, row_ranks)
    out = _out(g, n, H_OUT + OUT_PAD, dtype)
    out_before, out_ref = out.clone(), out.clone()
    ops.sgmv_expand(y, b, indptr, seg_slots, lora_ranks, out, OFFSET)
    sgmv_expand_ref(y, b, indptr, seg_slots, lora_ranks, out_ref, OFFSET)
    _check_expand(out, out_ref, out_before, row_ranks, H_OUT, OFFSET, dtype)


@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_qkv_at_model_width(dtype, kind):
    """Shrink then three expands at offsets into one fused [n, q + k + v] output, h_in = 576."""
    h_in, h_outs, n = 576, [576, 192, 192], 33
    g = _seed("fused", dtype, kind)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    slot_ids = _slot_ids("with_none", n, g)
    indptr, seg_slots = _segments("mixed", n, g)
    row_ranks = _row_ranks_bgmv(slot_ids) if kind == "bgmv" else _row_ranks_sgmv(indptr, seg_slots)
    index = (slot_ids,) if kind == "bgmv" else (indptr, seg_slots)
    shrink, shrink_ref = (
        (ops.bgmv_shrink, bgmv_shrink_ref) if kind == "bgmv" else (ops.sgmv_shrink, sgmv_shrink_ref)
    )
    expand, expand_ref = (
        (ops.bgmv_expand, bgmv_expand_ref) if kind == "bgmv" else (ops.sgmv_expand, sgmv_expand_ref)
    )
    x = _x(g, n, h_in, dtype)
    out = _out(g, n, sum(h_outs), dtype)
    out_before, out_ref = out.clone(), out.clone()
    offset = 0
    for h_out in h_outs:
        a, b = _stack(g, h_in, h_in**-0.5), _stack(g, h_out, 1.0)
        y, y_ref = torch.full((n, MAX_LORA_RANK), SENTINEL), torch.full((n, MAX_LORA_RANK), SENTINEL)
        shrink(x, a, *index, lora_ranks, y)
        shrink_ref(x, a, *index, lora_ranks, y_ref)
        _check_shrink(y, y_ref, row_ranks)
        expand(y, b, *index, lora_ranks, out, offset)
        expand_ref(y_ref, b, *index, lora_ranks, out_ref, offset)
        offset += h_out
    _check_expand(out, out_ref, out_before, row_ranks, sum(h_outs), 0, dtype)


@pytest.mark.parametrize("kind", ["bgmv", "bgmv_unsorted", "sgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_as_operands(dtype, kind):
    """Stacks, y and out that are views into larger buffers (offsets and strides not their own)."""
    n = 13
    g = _seed("views", dtype, kind)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    a_big = torch.randn(len(RANKS) + 2, MAX_LORA_RANK + 3, H_IN + 5, generator=g) * H_IN**-0.5
    b_big = torch.randn(len(RANKS) + 2, MAX_LORA_RANK + 3, H_OUT + 5, generator=g)
    a, b = a_big[1:-1, 2:-1, 3:-2], b_big[1:-1, 2:-1, 3:-2]  # [num_slots, MAX_LORA_RANK, h], non-contiguous
    x = _x(g, 2 * n, H_IN, dtype)[::2]  # [n, H_IN], row stride 2 * H_IN
    pattern = "with_none" if kind == "bgmv_unsorted" else "sorted"
    slot_ids = _slot_ids(pattern, n, g)
    indptr, seg_slots = _segments("mixed", n, g)
    out_t = _out(g, H_OUT + OUT_PAD, n + 2, dtype)
    if kind == "sgmv":
        index, shrink, expand = (indptr, seg_slots), ops.sgmv_shrink, ops.sgmv_expand
        shrink_ref, expand_ref, row_ranks = (
            sgmv_shrink_ref,
            sgmv_expand_ref,
            _row_ranks_sgmv(indptr, seg_slots),
        )
    else:
        index, shrink, expand = (slot_ids,), ops.bgmv_shrink, ops.bgmv_expand
        shrink_ref, expand_ref, row_ranks = bgmv_shrink_ref, bgmv_expand_ref, _row_ranks_bgmv(slot_ids)
    y = torch.full((n + 1, MAX_LORA_RANK + 7), SENTINEL)[1:, 5:-2]  # [n, MAX_LORA_RANK] view
    y_ref = torch.full((n, MAX_LORA_RANK), SENTINEL)
    shrink(x, a, *index, lora_ranks, y)
    shrink_ref(x, a, *index, lora_ranks, y_ref)
    _check_shrink(y, y_ref, row_ranks)
    out = out_t.T[2:]  # [n, H_OUT + OUT_PAD], column-major, storage offset 2
    out_before, out_ref = out.clone(), out.clone()
    expand(y, b, *index, lora_ranks, out, OFFSET)
    expand_ref(y_ref, b, *index, lora_ranks, out_ref, OFFSET)
    _check_expand(out, out_ref, out_before, row_ranks, H_OUT, OFFSET, dtype)


def _dense(x, a, b, row_slots, out):
    """Independent float64 computation: per-row A/B gathered, masked to each slot's rank, einsum."""
    row_ranks = _row_ranks_bgmv(row_slots)
    keep = (torch.arange(MAX_LORA_RANK) < row_ranks[:, None])[:, :, None]  # [n, MAX_LORA_RANK, 1]
    a_rows = torch.where(keep, a[row_slots.long()].double(), 0.0)  # [n, MAX_LORA_RANK, h_in]
    b_rows = torch.where(keep, b[row_slots.long()].double(), 0.0)  # [n, MAX_LORA_RANK, h_out]
    y = torch.einsum("nh,nrh->nr", x.double(), a_rows)  # [n, MAX_LORA_RANK]
    y = torch.where(keep[:, :, 0], y, SENTINEL)
    delta = torch.einsum("nr,nrh->nh", torch.where(keep[:, :, 0], y, 0.0), b_rows)
    out = out.double().clone()
    out[:, OFFSET : OFFSET + b.shape[2]] += delta
    return y, out


@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_reference_matches_dense_einsum(kind):
    """The spec itself, checked against an implementation that shares none of its loops."""
    n = 11
    g = _seed("dense", kind)
    a, b = _stack(g, H_IN, H_IN**-0.5), _stack(g, H_OUT, 1.0)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    x = _x(g, n, H_IN, torch.float32)
    out = _out(g, n, H_OUT + OUT_PAD, torch.float32)
    y = torch.full((n, MAX_LORA_RANK), SENTINEL)
    out_ref = out.clone()
    if kind == "bgmv":
        row_slots = _slot_ids("with_none", n, g)
        bgmv_shrink_ref(x, a, row_slots, lora_ranks, y)
        bgmv_expand_ref(y, b, row_slots, lora_ranks, out_ref, OFFSET)
    else:
        indptr, seg_slots = _segments("mixed", n, g)
        row_slots = seg_slots.repeat_interleave((indptr[1:] - indptr[:-1]).long())
        sgmv_shrink_ref(x, a, indptr, seg_slots, lora_ranks, y)
        sgmv_expand_ref(y, b, indptr, seg_slots, lora_ranks, out_ref, OFFSET)
    assert (_row_ranks_bgmv(row_slots) == 0).any() and (_row_ranks_bgmv(row_slots) > 0).any()
    y_dense, out_dense = _dense(x, a, b, row_slots, out)
    torch.testing.assert_close(y.double(), y_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ref.double(), out_dense, rtol=1e-5, atol=1e-5)


def test_no_work_leaves_everything_untouched():
    """Empty batches and batches whose rows all map to rank-0 slots change nothing."""
    a, b = _stack(_seed("none"), H_IN, 1.0), _stack(_seed("none"), H_OUT, 1.0)
    lora_ranks = torch.tensor(RANKS, dtype=torch.int32)
    for n in (0, 5):
        x, y = torch.ones(n, H_IN, dtype=torch.bfloat16), torch.full((n, MAX_LORA_RANK), SENTINEL)
        out = torch.ones(n, H_OUT, dtype=torch.bfloat16)
        slot_ids, indptr = torch.zeros(n, dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
        seg_slots = torch.zeros(1, dtype=torch.int32)
        ops.bgmv_shrink(x, a, slot_ids, lora_ranks, y)
        ops.sgmv_shrink(x, a, indptr, seg_slots, lora_ranks, y)
        ops.bgmv_expand(y, b, slot_ids, lora_ranks, out)
        ops.sgmv_expand(y, b, indptr, seg_slots, lora_ranks, out)
        assert torch.equal(y, torch.full_like(y, SENTINEL)) and torch.equal(out, torch.ones_like(out))


def test_contract_and_selection():
    assert isinstance(select_lora_ops(torch.device("cpu")), TorchLoraOps)
    assert ops.decode_uses_segments is True
    for dtype in DTYPES:
        assert ops.stack_dtype(dtype) == torch.float32


def test_rejects_wrong_dtype_and_sizes():
    lora_ranks, slot_ids = torch.tensor(RANKS, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    a, y = torch.zeros(len(RANKS), MAX_LORA_RANK, H_IN), torch.zeros(2, MAX_LORA_RANK)
    with pytest.raises(ValueError, match="float32"):
        ops.bgmv_shrink(torch.zeros(2, H_IN), a.bfloat16(), slot_ids, lora_ranks, y)
    with pytest.raises(ValueError, match="sizes disagree"):
        ops.bgmv_shrink(torch.zeros(2, H_IN + 1), a, slot_ids, lora_ranks, y)
    with pytest.raises(ValueError, match="slot_ids has 3 entries"):
        ops.bgmv_shrink(torch.zeros(2, H_IN), a, torch.zeros(3, dtype=torch.int32), lora_ranks, y)
    with pytest.raises(ValueError, match="slot ids range"):
        ops.bgmv_shrink(
            torch.zeros(2, H_IN), a, torch.tensor([1, len(RANKS)], dtype=torch.int32), lora_ranks, y
        )
    with pytest.raises(ValueError, match="slot ids range"):
        ops.sgmv_shrink(
            torch.zeros(2, H_IN), a, torch.tensor([0, 2], dtype=torch.int32), -slot_ids[:1] - 1, lora_ranks, y
        )
    with pytest.raises(ValueError, match="segment_indptr"):
        ops.sgmv_shrink(
            torch.zeros(2, H_IN), a, torch.tensor([0, 3], dtype=torch.int32), slot_ids[:1], lora_ranks, y
        )
    with pytest.raises(ValueError, match="lora_ranks"):
        ops.sgmv_shrink(
            torch.zeros(2, H_IN),
            a,
            torch.tensor([0, 2], dtype=torch.int32),
            slot_ids[:1],
            lora_ranks + MAX_LORA_RANK,
            y,
        )
    with pytest.raises(ValueError, match="out"):
        ops.bgmv_expand(
            y, torch.zeros(len(RANKS), MAX_LORA_RANK, H_OUT), slot_ids, lora_ranks, torch.zeros(2, H_OUT), 1
        )
