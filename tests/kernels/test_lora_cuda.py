"""CudaLoraOps (csrc/lora_gather_matmul.cu) against the reference loops of worker/kernels/reference.py.

The reference loops run on the GPU too (float32 matmuls per row; the index tensors they read stay on
the host, so they never synchronise per row). Stacks hold NaN in every row past a slot's rank, y holds
NaN past each row's rank before expand and is NaN before shrink, so any read or write the spec rules
out shows up. Skipped without CUDA (tests/conftest.py); tests/gpu/run.sh runs them on a GPU machine.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from worker.kernels.reference import bgmv_expand_ref, bgmv_shrink_ref, sgmv_expand_ref, sgmv_shrink_ref

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
HIDDEN_SIZES = [576, 4096, 11008, 14336]
RANKS = [4, 8, 16, 64, 128]
SLOT_PATTERNS = ["distinct", "same", "zipf", "with_none"]
BATCH_SIZES = [1, 3, 7, 133]
# (rtol, atol) for `out` in the model dtype: one rounding of a differently ordered fp32 sum may differ by
# an ulp. y is float32 from the same exact products (16-bit x 16-bit fits fp32), only the order differs.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
Y_TOL = (1e-4, 1e-4)
OUT_PAD = 24  # out is [n, h_out + OUT_PAD], written at columns [OUT_OFFSET, OUT_OFFSET + h_out)
OUT_OFFSET = 16


def _generator(device, *parts) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash)."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(parts).encode()))


def _slot_ranks(num_slots: int, rank: int) -> list[int]:
    """Slot 0 has no adapter; the others mix the full rank with smaller and odd ones."""
    choices = [rank, max(1, rank // 2), max(1, rank - 3)]
    return [0] + [choices[s % 3] for s in range(1, num_slots)]


def _slot_ids(pattern: str, n: int, num_slots: int, g: torch.Generator) -> list[int]:
    """The slot of each row (slots 1.. have adapters)."""
    if pattern == "distinct":
        return [1 + i % (num_slots - 1) for i in range(n)]
    if pattern == "same":
        return [1] * n
    if pattern == "zipf":  # popularity 1 / k^1.5 over the adapters, shuffled
        weights = 1.0 / torch.arange(1, num_slots, dtype=torch.float64) ** 1.5
        perm = torch.randperm(num_slots - 1, generator=g) + 1
        return perm[torch.multinomial(weights, n, True, generator=g)].tolist()
    if pattern == "with_none":  # about a third of the rows have no adapter
        ids = torch.randint(1, num_slots, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.35] = 0
        return ids.tolist()
    if pattern == "runs":  # prefill: runs of 1 to 40 rows per adapter (some with none), as the engine sorts
        ids = []
        while len(ids) < n:
            slot = int(torch.randint(0, num_slots, (1,), generator=g))
            ids += [slot] * int(torch.randint(1, 41, (1,), generator=g))
        return ids[:n]
    raise AssertionError(pattern)


def _segments(slot_ids: list[int]) -> tuple[list[int], list[int]]:
    """Runs of equal slots as sgmv segments, plus empty segments at both ends and after the first run."""
    indptr, seg_slots = [0, 0], [1]  # an empty segment first
    for i, s in enumerate(slot_ids):
        if i == 0 or s != slot_ids[i - 1]:
            seg_slots.append(s)
            indptr.append(indptr[-1])
            if len(seg_slots) == 3:  # an empty segment after the first run
                seg_slots.insert(2, 2)
                indptr.insert(2, indptr[2])
        indptr[-1] += 1
    seg_slots.append(0)
    indptr.append(indptr[-1])
    return indptr, seg_slots


def _stack(num_slots, max_lora_rank, h, ranks, dtype, device, g, scale) -> torch.Tensor:
    """[num_slots, max_lora_rank, h] with N(0, scale^2) values and NaN past each slot's rank."""
    stack = torch.randn(num_slots, max_lora_rank, h, generator=g, device=device, dtype=torch.float32) * scale
    for s, r in enumerate(ranks):
        stack[s, r:] = float("nan")
    return stack.to(dtype)


@dataclass
class Case:
    x: torch.Tensor  # [n, h_in]
    lora_a_stack: torch.Tensor  # [num_slots, max_lora_rank, h_in]
    lora_b_stack: torch.Tensor  # [num_slots, max_lora_rank, h_out]
    lora_ranks: torch.Tensor  # [num_slots] int32 on the device
    slot_ids: torch.Tensor  # [n] int32 on the device
    segment_indptr: torch.Tensor
    segment_slot_ids: torch.Tensor
    y_in: torch.Tensor  # [n, max_lora_rank] float32 expand input, NaN past each row's rank
    out: torch.Tensor  # [n, h_total] model dtype
    out_offset: int

    def host(self, name: str) -> torch.Tensor:
        """An index tensor on the host, for the reference loops."""
        return getattr(self, name).cpu()


def make_case(device, dtype, n, h_in, h_out, rank, pattern, out_pad=OUT_PAD, out_offset=OUT_OFFSET, seed=()):
    """A random problem of n rows with mixed ranks up to `rank` (the stack's max_lora_rank)."""
    g = _generator(device, dtype, n, h_in, h_out, rank, pattern, *seed)
    gh = _generator("cpu", dtype, n, h_in, h_out, rank, pattern, *seed)
    num_slots = n + 1 if pattern == "distinct" else min(n, 16) + 2
    ranks = _slot_ranks(num_slots, rank)
    slot_ids = _slot_ids(pattern, n, num_slots, gh)
    indptr, seg_slots = _segments(slot_ids)
    row_ranks = torch.tensor([ranks[s] for s in slot_ids], device=device)
    y_in = torch.randn(n, rank, generator=g, device=device)
    y_in[torch.arange(rank, device=device) >= row_ranks[:, None]] = float("nan")
    i32 = dict(dtype=torch.int32, device=device)
    return Case(
        x=torch.randn(n, h_in, generator=g, device=device).to(dtype),
        lora_a_stack=_stack(num_slots, rank, h_in, ranks, dtype, device, g, h_in**-0.5),
        lora_b_stack=_stack(num_slots, rank, h_out, ranks, dtype, device, g, rank**-0.5),
        lora_ranks=torch.tensor(ranks, **i32),
        slot_ids=torch.tensor(slot_ids, **i32),
        segment_indptr=torch.tensor(indptr, **i32),
        segment_slot_ids=torch.tensor(seg_slots, **i32),
        y_in=y_in,
        out=torch.randn(n, h_out + out_pad, generator=g, device=device).to(dtype),
        out_offset=out_offset,
    )


def _assert_y(y, y_ref, what):
    assert torch.equal(y.isnan(), y_ref.isnan()), f"{what}: y written where it must not be (or not written)"
    torch.testing.assert_close(
        y, y_ref, rtol=Y_TOL[0], atol=Y_TOL[1], equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check_case(ops, case: Case, what: str = "") -> None:
    """All four ops on `case` against the reference loops (bgmv with slot_ids, sgmv with segments)."""
    n, max_lora_rank = case.x.shape[0], case.lora_a_stack.shape[1]
    h_out, o = case.lora_b_stack.shape[2], case.out_offset
    ranks_h, slots_h = case.host("lora_ranks"), case.host("slot_ids")
    indptr_h, seg_slots_h = case.host("segment_indptr"), case.host("segment_slot_ids")
    for kind in ("bgmv", "sgmv"):
        y = torch.full((n, max_lora_rank), float("nan"), device=case.x.device)
        y_ref = y.clone()
        if kind == "bgmv":
            ops.bgmv_shrink(case.x, case.lora_a_stack, case.slot_ids, case.lora_ranks, y)
            bgmv_shrink_ref(case.x, case.lora_a_stack, slots_h, ranks_h, y_ref)
        else:
            ops.sgmv_shrink(
                case.x, case.lora_a_stack, case.segment_indptr, case.segment_slot_ids, case.lora_ranks, y
            )
            sgmv_shrink_ref(case.x, case.lora_a_stack, indptr_h, seg_slots_h, ranks_h, y_ref)
        _assert_y(y, y_ref, f"{what} {kind}_shrink")

        out, out_ref = case.out.clone(), case.out.clone()
        if kind == "bgmv":
            ops.bgmv_expand(case.y_in, case.lora_b_stack, case.slot_ids, case.lora_ranks, out, o)
            bgmv_expand_ref(case.y_in, case.lora_b_stack, slots_h, ranks_h, out_ref, o)
        else:
            segments = (case.segment_indptr, case.segment_slot_ids)
            ops.sgmv_expand(case.y_in, case.lora_b_stack, *segments, case.lora_ranks, out, o)
            sgmv_expand_ref(case.y_in, case.lora_b_stack, indptr_h, seg_slots_h, ranks_h, out_ref, o)
        assert_out_matches(out, out_ref, case.out, o, h_out, f"{what} {kind}_expand")


def assert_out_matches(out, out_ref, out_before, offset, h_out, what) -> None:
    """out equals the reference within the dtype's tolerance; outside the written columns, and in rows
    the reference left unchanged, it is bit-identical to before."""
    rtol, atol = OUT_TOL[out.dtype]
    torch.testing.assert_close(
        out.float(), out_ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )
    outside = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
    outside[offset : offset + h_out] = False
    assert torch.equal(out[:, outside], out_before[:, outside]), f"{what}: columns outside the slice changed"
    unchanged_rows = (out_ref == out_before).all(dim=1)
    assert torch.equal(out[unchanged_rows], out_before[unchanged_rows]), f"{what}: rows without LoRA changed"


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
    assert ops.stack_dtype(torch.bfloat16) == torch.bfloat16
    assert ops.stack_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="float64"):
        ops.stack_dtype(torch.float64)


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("pattern", SLOT_PATTERNS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("h", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_ref(ops, dtype, h, rank, pattern, n):
    case = make_case("cuda", dtype, n, h, h, rank, pattern)
    check_case(ops, case, f"{dtype} h={h} r={rank} {pattern} n={n}")


@pytest.mark.parametrize("n, tiles", [(7, "16x8"), (133, "16x8"), (133, "32x16")])
@pytest.mark.parametrize("pattern", [*SLOT_PATTERNS, "runs"])
@pytest.mark.parametrize("rank", [4, 16, 64, 128])
@pytest.mark.parametrize("h", [576, 4096, 14336])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_core_sgmv_matches_ref(ops, monkeypatch, dtype, h, rank, pattern, n, tiles):
    """The tensor-core sgmv kernels on every pattern, short segments included (the wrapper otherwise
    sends batches averaging under 8 rows per segment to the generic kernels), with both shrink tiles:
    16 rows x 8 ranks, and 32 x 16 (taken at thousands of rows; forced here by claiming one SM)."""
    monkeypatch.setattr(ops, "sgmv_mma_min_rows_per_segment", 0)
    if tiles == "32x16":
        monkeypatch.setattr(ops, "_num_sms", 1)
    case = make_case("cuda", dtype, n, h, h, rank, pattern, seed=("mma",))
    check_case(ops, case, f"mma {tiles} {dtype} h={h} r={rank} {pattern} n={n}")


def test_tensor_core_sgmv_is_enabled(ops):
    """sm_80+ runs the tensor-core sgmv kernels: the shrink kernel's shared memory was granted."""
    if torch.cuda.get_device_capability(ops.device) < (8, 0):
        pytest.skip("mma.sync needs sm_80")
    assert ops._mma


@pytest.mark.parametrize(
    "dtype, h_in, h_out, out_pad, out_offset",
    [
        (torch.bfloat16, 3424, 3424, 3424, 3424),  # TP shard of 13696 / 4, fused gate_up's second half
        (torch.float16, 3425, 37, 10, 3),  # odd sizes and offset: one element per access
        (torch.bfloat16, 577, 129, 7, 5),
        (torch.float32, 4096, 1024, 2048, 1024),  # float32 models (the tiny test model runs in it)
        (torch.float32, 150, 75, 5, 1),
        (torch.bfloat16, 64, 8, 0, 0),  # output narrower than one block
        (torch.float16, 8, 4096, 0, 0),
    ],
    ids=str,
)
@pytest.mark.parametrize("pattern", ["zipf", "with_none", "runs"])
def test_other_shapes_and_dtypes(ops, dtype, h_in, h_out, out_pad, out_offset, pattern):
    for n in (5, 70, 300):
        case = make_case("cuda", dtype, n, h_in, h_out, 16, pattern, out_pad, out_offset)
        check_case(ops, case, f"{dtype} {h_in}->{h_out} @{out_offset} n={n}")


def test_strided_x_and_out(ops):
    """x and out may be column slices of wider buffers (rows strided); y and the stacks are dense."""
    case = make_case("cuda", torch.bfloat16, 41, 512, 256, 8, "zipf", seed=("strided",))
    wide_x = torch.randn(41, 512 + 64, device="cuda").to(torch.bfloat16)
    wide_x[:, 32 : 32 + 512] = case.x
    case.x = wide_x[:, 32 : 32 + 512]
    check_case(ops, case, "strided")


def test_many_tokens(ops):
    """More rows than a grid's y dimension allows (65535): rows are on grid x."""
    n, h, rank = 70_001, 64, 8
    case = make_case("cuda", torch.float16, n, h, h, rank, "with_none", seed=("many",))
    y = torch.full((n, rank), float("nan"), device="cuda")
    ops.bgmv_shrink(case.x, case.lora_a_stack, case.slot_ids, case.lora_ranks, y)
    # A vectorised float32 reference, checked first against the loop reference on a slice of rows.
    r = case.lora_ranks[case.slot_ids.long()]  # [n] rank of each row
    a = case.lora_a_stack.float().nan_to_num()[case.slot_ids.long()]  # [n, rank, h]
    y_vec = torch.einsum("nh,nrh->nr", case.x.float(), a)
    y_vec[torch.arange(rank, device="cuda") >= r[:, None]] = float("nan")
    y_loop = torch.full((300, rank), float("nan"), device="cuda")
    bgmv_shrink_ref(
        case.x[:300], case.lora_a_stack, case.host("slot_ids")[:300], case.host("lora_ranks"), y_loop
    )
    _assert_y(y_vec[:300], y_loop, "vectorised reference")
    _assert_y(y, y_vec, "many tokens")


@pytest.mark.parametrize("min_rows", [8, 0], ids=["generic-sgmv", "tensor-core-sgmv"])
def test_sgmv_rows_past_last_segment_and_bad_slots_are_untouched(ops, monkeypatch, min_rows):
    monkeypatch.setattr(ops, "sgmv_mma_min_rows_per_segment", min_rows)
    n, h, rank = 20, 256, 8
    case = make_case("cuda", torch.bfloat16, n, h, h, rank, "same", seed=("edges",))
    indptr = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device="cuda")  # rows 9.. in no segment
    seg_slots = torch.tensor([1, 99, -1], dtype=torch.int32, device="cuda")  # 99, -1: outside the stack
    y = torch.full((n, rank), float("nan"), device="cuda")
    ops.sgmv_shrink(case.x, case.lora_a_stack, indptr, seg_slots, case.lora_ranks, y)
    assert not y[:3, : int(case.lora_ranks[1])].isnan().any()
    assert y[3:].isnan().all()
    out = case.out.clone()
    ops.sgmv_expand(case.y_in, case.lora_b_stack, indptr, seg_slots, case.lora_ranks, out, OUT_OFFSET)
    assert torch.equal(out[3:], case.out[3:])
    assert not torch.equal(out[:3], case.out[:3])
    # No segments at all, and zero rows: nothing happens.
    none = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(0, dtype=torch.int32, device="cuda")
    ops.sgmv_expand(case.y_in, case.lora_b_stack, *none, case.lora_ranks, out, OUT_OFFSET)
    empty = case.x[:0]
    ops.bgmv_shrink(empty, case.lora_a_stack, case.slot_ids[:0], case.lora_ranks, y[:0])


def _graph_inputs(pattern: str, seed: str) -> Case:
    return make_case("cuda", torch.bfloat16, 33, 1024, 1024, 16, pattern, seed=(seed,))


def _run_all(ops, c: Case, y_b, y_s, out_b, out_s) -> None:
    segments = (c.segment_indptr, c.segment_slot_ids)
    ops.bgmv_shrink(c.x, c.lora_a_stack, c.slot_ids, c.lora_ranks, y_b)
    ops.bgmv_expand(c.y_in, c.lora_b_stack, c.slot_ids, c.lora_ranks, out_b, c.out_offset)
    ops.sgmv_shrink(c.x, c.lora_a_stack, *segments, c.lora_ranks, y_s)
    ops.sgmv_expand(c.y_in, c.lora_b_stack, *segments, c.lora_ranks, out_s, c.out_offset)


@pytest.mark.parametrize("min_rows", [8, 0], ids=["generic-sgmv", "tensor-core-sgmv"])
def test_cuda_graph_replay_is_bit_equal_to_eager(ops, monkeypatch, min_rows):
    """Capture the four ops once, then replay on new values in the same buffers (other slots, ranks,
    segment boundaries of the same count): bit-equal to running them eagerly."""
    monkeypatch.setattr(ops, "sgmv_mma_min_rows_per_segment", min_rows)
    bufs = _graph_inputs("zipf", "first")
    n, max_lora_rank = bufs.x.shape[0], bufs.lora_a_stack.shape[1]

    def fresh_outputs():
        y = torch.full((n, max_lora_rank), float("nan"), device="cuda")
        return y, y.clone(), bufs.out.clone(), bufs.out.clone()

    graph_outs = fresh_outputs()
    out_init = bufs.out.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run_all(ops, bufs, *graph_outs)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_all(ops, bufs, *graph_outs)

    for shift, pattern in enumerate(("with_none", "same", "zipf"), start=1):
        new = _graph_inputs(pattern, "replay")
        if new.segment_slot_ids.shape != bufs.segment_slot_ids.shape:  # the graph's buffers keep their shape
            new.segment_indptr, new.segment_slot_ids = (
                bufs.segment_indptr.clone(),
                bufs.segment_slot_ids.clone(),
            )
        for name in ("x", "slot_ids", "segment_indptr", "segment_slot_ids", "y_in"):
            getattr(bufs, name).copy_(getattr(new, name))
        # Other ranks per slot (the rolled list), over stacks without NaN rows so any rank is valid data.
        bufs.lora_ranks.copy_(new.lora_ranks.roll(shift))
        bufs.lora_a_stack.copy_(new.lora_a_stack.nan_to_num(0.25))
        bufs.lora_b_stack.copy_(new.lora_b_stack.nan_to_num(0.25))
        for t in graph_outs[:2]:
            t.fill_(float("nan"))
        for t in graph_outs[2:]:
            t.copy_(out_init)
        graph.replay()
        eager_outs = fresh_outputs()
        _run_all(ops, bufs, *eager_outs)
        torch.cuda.synchronize()
        for got, want in zip(graph_outs, eager_outs, strict=True):
            assert torch.equal(got.nan_to_num(1234.5), want.nan_to_num(1234.5)), pattern


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "x", c.x.float()), "lora_a_stack must be a 3-d torch.float32"),
        (lambda c: setattr(c, "x", c.x.cpu()), "x must be a 2-d"),
        (lambda c: setattr(c, "slot_ids", c.slot_ids[:-1]), "slot_ids has 6 entries, expected 7"),
        (lambda c: setattr(c, "lora_ranks", c.lora_ranks.long()), "lora_ranks must be a 1-d torch.int32"),
        (lambda c: setattr(c, "lora_ranks", c.lora_ranks[:-1]), "lora_ranks has 8 entries, expected 9"),
        (lambda c: setattr(c, "lora_a_stack", c.lora_a_stack[:, :, 1:].contiguous()), r"x \(7, 64\), lora_a"),
        (lambda c: setattr(c, "lora_a_stack", c.lora_a_stack.transpose(1, 2)), "must be contiguous"),
        (lambda c: setattr(c, "y_in", c.y_in[:, :4]), r"expected y \[7, 8\]"),
    ],
)
def test_bad_arguments_name_the_sizes(ops, mutate, message):
    case = make_case("cuda", torch.bfloat16, 7, 64, 32, 8, "zipf", seed=("errors",))
    case.y_in = torch.zeros(7, 8, device="cuda")  # the shrink output here
    mutate(case)
    with pytest.raises(ValueError, match=message):
        ops.bgmv_shrink(case.x, case.lora_a_stack, case.slot_ids, case.lora_ranks, case.y_in)


def test_bad_expand_arguments_name_the_sizes(ops):
    case = make_case("cuda", torch.bfloat16, 7, 64, 32, 8, "zipf", seed=("errors",))
    with pytest.raises(ValueError, match=r"columns \[50, 82\) within out's 56"):
        ops.bgmv_expand(case.y_in, case.lora_b_stack, case.slot_ids, case.lora_ranks, case.out, 50)
    with pytest.raises(ValueError, match="must be contiguous"):
        b = case.lora_b_stack.transpose(0, 1).contiguous().transpose(0, 1)
        ops.bgmv_expand(case.y_in, b, case.slot_ids, case.lora_ranks, case.out, 0)
    with pytest.raises(ValueError, match="segment_indptr has 3 entries, expected"):
        indptr = case.segment_indptr[:3]
        ops.sgmv_expand(
            case.y_in, case.lora_b_stack, indptr, case.segment_slot_ids, case.lora_ranks, case.out
        )
