"""Host-side plans of the CPU LoRA ops over the pool: what a step's rows and a site's ranks ask for.

Every LoRA site of a step sees the same rows (`StepRows`), and every layer's site of one kind (qkv,
o, gate_up, down) usually sees the same ranks, so the decisions are made once and memoized:

- `SegmentPlan` (per distinct segmentation and adapter set, kept across steps while they stay): the
  validated segments, in row order; for bgmv rows that interleave adapters, the host permutation that
  sorts them by adapter (rows are then computed on a gathered copy and scattered back).
- `SiteShape` (per plan and rank signature of a site's parts): the segments with a delta, each one's
  rank per part, the site's column span, and the rank buckets of the grouped path (`torch_grouped.py`)
  or None for one matmul per segment (long segments: prefill).
- `Layout` (per site shape): how the grouped path's padded rows map to batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.kernels.pool_args import PoolPart, StepRows

# bgmv rows whose adapters form at most (distinct adapters + this) runs are computed run by run in
# place; past that, one host sort plus a gather/scatter of the rows is cheaper than the extra matmuls.
_MAX_EXTRA_RUNS = 4
# Segments longer than this (prefill) run one matmul per segment: padding them costs real flops.
MAX_GROUP_ROWS = 64
# A bucket whose members pad to more than this many rows per real row is split by segment length.
_MAX_PAD_FACTOR = 2

Group = tuple[int, int, int]  # (p, q, g): rows [p, q) of the plan use adapter g


def lora_rank_bucket(lora_rank: int) -> int:
    """The padded rank an adapter's part computes at in the grouped path: the next of 1, 2, 3, 4, 6, 8,
    12, 16, 24, ... (powers of two and 1.5 times them): a rank-8 adapter does not pay for a rank-32
    one's bytes and flops, and no rank is padded by half of itself or more."""
    power = 1 << (lora_rank - 1).bit_length()
    return power * 3 // 4 if power >= 4 and lora_rank <= power * 3 // 4 else power


@dataclass(frozen=True)
class Bucket:
    """Segments computed by one shrink bmm and one expand bmm per part: indices into SiteShape.groups,
    the padded rank of each part (0: no member targets it) and the padded rows."""

    members: tuple[int, ...]
    part_ranks: tuple[int, ...]  # R_p >= every member's rank in part p
    rows: int  # T_b: the longest member

    @property
    def lora_rank(self) -> int:
        """R_b: the rows of a member's concatenated A copy, every part's R_p."""
        return sum(self.part_ranks)


@dataclass
class Layout:
    """Where the grouped path's padded rows come from and go back to."""

    shapes: tuple[tuple[int, int], ...]  # (G_b, T_b) per bucket
    # Either the padded rows are batch rows [start, start + total) as they are (no padding, no gaps) ...
    start: int | None
    # ... or they are gathered: the batch row of each padded row (padding repeats a real row, whose
    # delta is never read back), and the padded row of each batch row (rows not computed -> total, the
    # delta buffer's zero row). A gather both ways: a CPU index_add_ into rows is a slow scatter.
    pad_index: torch.Tensor | None  # [total] int64
    back_index: torch.Tensor | None  # [num_rows] int64
    whole: bool = False  # in place over all of the batch's rows: x and out need no row views

    @property
    def total(self) -> int:
        return sum(g * t for g, t in self.shapes)


@dataclass
class SiteShape:
    """What one site asks of one plan (module docstring); mutable only to fill the lazy fields."""

    groups: tuple[Group, ...]  # non-empty segments whose adapter targets some part, in row order
    ranks: tuple[tuple[int, ...], ...]  # per group: its adapter's rank in each part (0 = untargeted)
    columns: tuple[int, ...]  # per part: its first column relative to col_lo
    widths: tuple[int, ...]  # per part: its h_out
    col_lo: int  # the parts' columns span [col_lo, col_hi) of out
    col_hi: int
    buckets: tuple[Bucket, ...] | None  # None: one matmul per segment
    # Per bucket: what its copies hold (part ranks, and each member's handle and ranks), their cache
    # key: a batch that changes keeps the copies of the buckets it does not change.
    contents: tuple = ()
    layout: Layout | None = None  # the grouped path's, made on first use
    buffers: tuple | None = None  # the grouped path's float32 scratch and its views, made on first use


@dataclass
class SegmentPlan:
    """One StepRows' segments, validated (see the module docstring)."""

    bounds: list[int]  # [S + 1] row bounds, of the sorted rows when `order` is set
    adapters_of: list[int]  # [S] g per segment
    handles: tuple[int, ...]  # [G] the step's adapter handles
    num_rows: int
    order: torch.Tensor | None = None  # [T] int64: sorted row i is row order[i] (bgmv only)
    shapes: dict[tuple, SiteShape] = field(default_factory=dict)
    # The grouped path's float32 scratch, shared by the site shapes that write the same regions of it.
    buffers: dict[tuple, tuple] = field(default_factory=dict)
    # (kind, rows, width) -> float32 scratch of the segment path, reused by every layer: with megabytes
    # allocated per call, the casts into them (fresh pages) took about twice as long here.
    _scratch: dict[tuple, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, rows: StepRows) -> SegmentPlan:
        bounds, gs, n, num_adapters = (
            list(rows.host_indptr),
            list(rows.host_segment_adapters),
            rows.num_rows,
            len(rows.adapters),
        )
        if (
            len(bounds) != len(gs) + 1
            or bounds[0] != 0
            or any(q < p for p, q in zip(bounds, bounds[1:], strict=False))
        ):
            raise ValueError(f"rows: host_indptr {bounds} does not fit {len(gs)} segments from row 0")
        if gs and not -1 <= min(gs) <= max(gs) < num_adapters:
            raise ValueError(
                f"rows: adapter indices span [{min(gs)}, {max(gs)}], outside [-1, {num_adapters})"
            )
        if rows.use_segments or len(gs) <= len(set(gs)) + _MAX_EXTRA_RUNS:
            return cls(bounds, gs, rows.adapters, n)
        # bgmv rows interleaving adapters: a stable host sort by g, then one segment per adapter.
        row_g = [g for i, g in enumerate(gs) for _ in range(bounds[i + 1] - bounds[i])]
        order = sorted(range(n), key=row_g.__getitem__)
        sorted_gs = sorted(set(gs))
        counts = {g: 0 for g in sorted_gs}
        for g in row_g:
            counts[g] += 1
        sorted_bounds = [0]
        for g in sorted_gs:
            sorted_bounds.append(sorted_bounds[-1] + counts[g])
        return cls(sorted_bounds, sorted_gs, rows.adapters, n, torch.tensor(order, dtype=torch.long))

    def scratch(self, kind: str, rows: int, width: int, device) -> torch.Tensor:
        """A float32 [rows, width] scratch, the same tensor for every call with these arguments."""
        key = (kind, rows, width)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(rows, width, dtype=torch.float32, device=device)
        return self._scratch[key]

    def site(self, parts: tuple[PoolPart, ...] | list[PoolPart]) -> SiteShape:
        """The SiteShape of these parts (memoized by their ranks, columns and widths)."""
        signature = tuple((p.host_lora_ranks, p.out_offset, p.h_out, p.a_rows.shape[1]) for p in parts)
        shape = self.shapes.get(signature)
        if shape is None:  # a ValueError below is raised again on every call: nothing is stored
            shape = self.shapes[signature] = self._site(signature)
        return shape

    def _site(self, signature) -> SiteShape:
        for i, (ranks, _, _, r_max) in enumerate(signature):
            if ranks and not 0 <= min(ranks) <= max(ranks) <= r_max:
                raise ValueError(f"parts[{i}]: host_lora_ranks {ranks} outside [0, R_max = {r_max}]")
        spans = sorted((offset, offset + h_out) for _, offset, h_out, _ in signature)
        if spans[0][0] < 0 or any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
            raise ValueError(f"parts: output columns {spans} overlap or start below 0")
        col_lo, col_hi = spans[0][0], spans[-1][1]
        groups, ranks = [], []
        for s, g in enumerate(self.adapters_of):
            p, q = self.bounds[s], self.bounds[s + 1]
            if g < 0 or q == p:
                continue
            part_ranks = tuple(r[g] for r, _, _, _ in signature)
            if any(part_ranks):
                groups.append((p, q, g))
                ranks.append(part_ranks)
        shape = SiteShape(
            tuple(groups),
            tuple(ranks),
            tuple(offset - col_lo for _, offset, _, _ in signature),
            tuple(h_out for _, _, h_out, _ in signature),
            col_lo,
            col_hi,
            _buckets(groups, ranks),
        )
        if shape.buckets is not None:
            shape.contents = tuple(
                (b.part_ranks, tuple((self.handles[groups[i][2]], ranks[i]) for i in b.members))
                for b in shape.buckets
            )
        return shape

    def layout(self, shape: SiteShape, device) -> Layout:
        """The buckets' segments, in order, each padded to its bucket's T_b rows (see Layout)."""
        buckets = shape.buckets
        layout = shape.layout
        if layout is None:
            members = [shape.groups[i] for b in buckets for i in b.members]
            shapes = tuple((len(b.members), b.rows) for b in buckets)
            first, rows = members[0][0], members[0][1] - members[0][0]
            if all(p == first + k * rows and q - p == rows for k, (p, q, _) in enumerate(members)):
                whole = first == 0 and len(members) * rows == self.num_rows
                layout = Layout(shapes, first, None, None, whole)
            else:
                pad: list[int] = []
                back = [sum(g * t for g, t in shapes)] * self.num_rows
                for b in buckets:
                    for i in b.members:
                        p, q, _ = shape.groups[i]
                        back[p:q] = range(len(pad), len(pad) + q - p)
                        pad += range(p, q)
                        pad += [p] * (b.rows - (q - p))

                def as_index(values):
                    return torch.tensor(values, dtype=torch.long, device=device)

                layout = Layout(shapes, None, as_index(pad), as_index(back))
            shape.layout = layout
        return layout


def _buckets(groups: list[Group], ranks: list[tuple[int, ...]]) -> tuple[Bucket, ...] | None:
    """The grouped path's buckets, or None when a segment is too long for it. Segments whose adapters
    have the same rank bucket in every part share one bmm per part wherever they are (the layout gathers
    them), split by length class only when padding them to the longest would more than double their
    rows."""
    lengths = [q - p for p, q, _ in groups]
    if not groups or max(lengths) > MAX_GROUP_ROWS:
        return None
    by_rank: dict[tuple[int, ...], list[int]] = {}
    for i, part_ranks in enumerate(ranks):
        by_rank.setdefault(tuple(lora_rank_bucket(r) if r else 0 for r in part_ranks), []).append(i)
    buckets = []
    for part_ranks, members in by_rank.items():
        longest = max(lengths[i] for i in members)
        if longest * len(members) <= _MAX_PAD_FACTOR * sum(lengths[i] for i in members):
            buckets.append(Bucket(tuple(members), part_ranks, longest))
            continue
        by_length: dict[int, list[int]] = {}
        for i in members:
            by_length.setdefault((lengths[i] - 1).bit_length(), []).append(i)
        for split in by_length.values():
            buckets.append(Bucket(tuple(split), part_ranks, max(lengths[i] for i in split)))
    return tuple(buckets)
