"""The CPU's fused sgmv (shrink then expand) for many short segments: a few batched matmuls per call.

With one matmul per segment (torch_ops.py), a decode batch of 32 rows over 8 adapters costs 16 small
matmuls per layer stack, each dominated by its dispatch: about 2,000 calls per step on a 30-layer
model, whatever the flops. Here the segments run as one `bmm` pair (shrink, expand) per run of
consecutive segments in one rank bucket, each segment padded to the longest of its run, so a call costs
a handful of ops whatever the number of adapters (`TorchLoraOps.row_order` puts the rows of adapters of
one LoRA rank next to each other, so there is one run per bucket). When the segments are contiguous
and of equal length (no padding), x and out are used in place instead of gathered: at large batches
the gathers' memory traffic, not the weights', is what LoRA costs.

`bmm` needs every segment's A and B at one shape and stride, so the stack rows of the batch's slots are
copied into [groups, rank, h] tensors, one per rank bucket (ranks rounded up to a power of two or 1.5
times one: a rank-8 adapter does not pay for a rank-32 one's bytes and flops), zeroed past each slot's
true rank so nothing past a rank is read. A decode batch keeps its adapters for many steps, so the
copies are cached per stack and rebuilt only when the batch's slots or the stacks change (loading an
adapter bumps the stacks' version counters). The cache is bounded: past `cache_bytes` the copies are
made on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Padding: past this many padded rows per real row, or for long segments (prefill), one matmul per
# segment is cheaper than padded batched matmuls.
_MAX_PAD_FACTOR = 2
_MAX_GROUP_ROWS = 64
# Below this many segments with an adapter, one matmul per segment costs fewer ops than the path here.
_MIN_GROUPS = 3
# Plans remembered at once (see GroupedLora.plan): a step uses one or two.
_PLANS_KEPT = 4

# Segments of one stack, grouped: ((segment, ...), rank bucket) per run of consecutive segments (in
# segment order) sharing a bucket.
Buckets = tuple[tuple[tuple[int, ...], int], ...]


@dataclass
class Layout:
    # (G_b, T_b) per bucket: its segments, each padded to T_b rows (the longest of them). Padding to each
    # run's own longest segment, not the call's, computes 16% fewer rows at 64 decode rows over 8 adapters
    # of ranks 8/16/32 drawn uniformly (96 -> 81 rows, mean of 200 draws).
    shapes: tuple[tuple[int, int], ...]
    # Either the padded rows are batch rows [start, start + total) as they are (no padding, no gaps) ...
    start: int | None
    # ... or they are gathered: the batch row of each padded row (padding -> num_rows, a zero row), and
    # the padded row of each batch row (rows not computed -> total, the delta buffer's zero row).
    pad_index: torch.Tensor | None  # [total]
    back_index: torch.Tensor | None  # [num_rows]

    @property
    def total(self) -> int:
        """Padded rows of all buckets: sum of G_b * T_b."""
        return sum(g * t for g, t in self.shapes)


@dataclass
class SegmentPlan:
    """Host-side view of a step's segments, shared by every layer (and by later steps while the
    segments stay the same)."""

    bounds: list[int]  # segment_indptr
    slots: list[int]  # segment_slot_ids
    num_rows: int
    layouts: dict[Buckets, Layout] = field(default_factory=dict)
    scratch: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)  # (kind, rows, width)
    # Host-side decisions per stack rank pattern (every layer's stacks of one kind share one), made once:
    # a decode step makes ~120 LoRA calls, each of which would otherwise redo them in Python.
    memo: dict[tuple, object] = field(default_factory=dict)

    def __post_init__(self):
        if (
            len(self.bounds) != len(self.slots) + 1
            or self.bounds[0] != 0
            or self.bounds[-1] > self.num_rows
            or any(q < p for p, q in zip(self.bounds, self.bounds[1:], strict=False))
        ):
            raise ValueError(
                f"segment_indptr {self.bounds} does not fit {len(self.slots)} segments of "
                f"{self.num_rows} rows"
            )

    def length(self, g: int) -> int:
        return self.bounds[g + 1] - self.bounds[g]

    def layout(self, buckets: Buckets, device) -> Layout:
        """The included segments, in order, each padded to its bucket's T_b rows (see Layout). A gather
        both ways where needed: a CPU index_add_ into rows is a slow scatter."""
        if buckets not in self.layouts:
            shapes = tuple((len(members), max(self.length(g) for g in members)) for members, _ in buckets)
            segments = [g for members, _ in buckets for g in members]
            rows = self.length(segments[0])
            first = self.bounds[segments[0]]
            if all(
                self.length(g) == rows and self.bounds[g] == first + i * rows for i, g in enumerate(segments)
            ):
                self.layouts[buckets] = Layout(shapes, first, None, None)
                return self.layouts[buckets]
            pad: list[int] = []
            back = [sum(g * t for g, t in shapes)] * self.num_rows
            for (members, _), (_, pad_rows) in zip(buckets, shapes, strict=True):
                for g in members:
                    p, q = self.bounds[g], self.bounds[g + 1]
                    back[p:q] = range(len(pad), len(pad) + q - p)
                    pad += range(p, q)
                    pad += [self.num_rows] * (pad_rows - (q - p))

            def as_index(values):
                return torch.tensor(values, dtype=torch.long, device=device)

            self.layouts[buckets] = Layout(shapes, None, as_index(pad), as_index(back))
        return self.layouts[buckets]

    def buffer(self, kind: str, rows: int, width: int, device) -> torch.Tensor:
        """A float32 [rows + 1, width] scratch whose last row stays zero, reused by every layer."""
        key = (kind, rows, width)
        if key not in self.scratch:
            self.scratch[key] = torch.zeros(rows + 1, width, dtype=torch.float32, device=device)
        return self.scratch[key]


def lora_rank_bucket(lora_rank: int) -> int:
    """The padded LoRA rank a slot of this rank computes at: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (powers of two and 1.5 times them). A fused q/k/v stack has slot rank 3r, which these hold exactly
    for the usual r (a power of two), where powers of two alone would pad its copies by a third."""
    power = 1 << (lora_rank - 1).bit_length()
    return power * 3 // 4 if power >= 4 and lora_rank <= power * 3 // 4 else power


@dataclass
class _Copies:
    stacks: tuple[torch.Tensor, torch.Tensor]  # the stacks copied (held: their ids stay unique)
    key: tuple
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # per bucket: A [G_b, h_in, r_b], B [G_b, r_b, h_out]
    nbytes: int


class GroupedLora:
    """Fused shrink + expand over padded segments, with cached per-batch weight copies."""

    def __init__(self, cache_bytes: int = 1 << 30):
        self.cache_bytes = cache_bytes
        # The plans of the last few distinct segmentations: a join step alternates two (its prompt rows
        # and its decode rows) in every layer.
        self._plans: dict[tuple, SegmentPlan] = {}
        self._cache: dict[int, _Copies] = {}  # id of a lora_a_stack -> its copies
        self._cached_bytes = 0

    def plan(
        self, segment_indptr: torch.Tensor, segment_slot_ids: torch.Tensor, num_rows: int
    ) -> SegmentPlan:
        """The plan of these segments, reused while they stay the same."""
        bounds, slots = segment_indptr.tolist(), segment_slot_ids.tolist()
        key = (tuple(bounds), tuple(slots), num_rows)
        plan = self._plans.get(key)
        if plan is None:
            plan = SegmentPlan(bounds, slots, num_rows)
            if len(self._plans) >= _PLANS_KEPT:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan
        return plan

    @staticmethod
    def buckets(plan: SegmentPlan, ranks: list[int]) -> Buckets | None:
        """The segments this stack computes (non-empty, slot rank > 0) by rank bucket, or None when one
        matmul per segment is the cheaper way. ranks: the stack's rank of each slot."""
        key = ("buckets", tuple(ranks))
        if key not in plan.memo:  # a ValueError below is raised again on every call: nothing is stored
            plan.memo[key] = GroupedLora._buckets(plan, ranks)
        return plan.memo[key]

    @staticmethod
    def _buckets(plan: SegmentPlan, ranks: list[int]) -> Buckets | None:
        if ranks and min(ranks) < 0:
            raise ValueError(f"lora_ranks {ranks} must not be negative")
        if plan.slots and not 0 <= min(plan.slots) <= max(plan.slots) < len(ranks):
            raise ValueError(
                f"slot ids range over [{min(plan.slots)}, {max(plan.slots)}], outside [0, {len(ranks)})"
            )
        included = [g for g, s in enumerate(plan.slots) if ranks[s] and plan.length(g)]
        if len(included) < _MIN_GROUPS:
            return None
        runs: list[tuple[list[int], int]] = []
        for g in included:
            bucket = lora_rank_bucket(ranks[plan.slots[g]])
            if runs and runs[-1][1] == bucket:
                runs[-1][0].append(g)
            else:
                runs.append(([g], bucket))
        longest = [max(plan.length(g) for g in members) for members, _ in runs]
        padded = sum(len(members) * t for (members, _), t in zip(runs, longest, strict=True))
        if max(longest) > _MAX_GROUP_ROWS or padded > _MAX_PAD_FACTOR * sum(map(plan.length, included)):
            return None
        return tuple((tuple(members), r) for members, r in runs)

    def apply(
        self,
        plan: SegmentPlan,
        buckets: Buckets,
        x: torch.Tensor,
        lora_a_stack: torch.Tensor,
        lora_b_stack: torch.Tensor,
        ranks: list[int],
        out: torch.Tensor,
        out_offset: int,
    ) -> None:
        """out[p:q, o:o+h_out] += (x[p:q] @ A[s, :r].T) @ B[s, :r] for the segments in `buckets` (float32
        sum, rounded once). x: [num_rows, h_in]; out: [num_rows, h_total]."""
        device, n = x.device, plan.num_rows
        h_in, h_out = lora_a_stack.shape[2], lora_b_stack.shape[2]
        layout = plan.layout(buckets, device)
        weights = self._weights(plan, buckets, lora_a_stack, lora_b_stack, ranks)
        if layout.start is not None:
            x_rows = x.narrow(0, layout.start, layout.total).to(torch.float32)  # [total, h_in]
        else:
            xz = plan.buffer("x", n, h_in, device)  # [n + 1, h_in], last row zero
            xz[:n].copy_(x)
            x_rows = xz.index_select(0, layout.pad_index)  # [total, h_in]
        delta, delta_rows, delta_parts = self._delta(plan, buckets, layout, h_out, device)
        row = 0
        for (groups, rows), (a, b), part in zip(layout.shapes, weights, delta_parts, strict=True):
            x_pad = x_rows.narrow(0, row, groups * rows).view(groups, rows, h_in)  # [G_b, T_b, h_in]
            torch.bmm(torch.bmm(x_pad, a), b, out=part)  # via [G_b, T_b, r_b]
            row += groups * rows
        dst = out.narrow(1, out_offset, h_out)  # [n, h_out] view
        # In-place add of a float32 delta into a half-precision out sums in float32, rounded once.
        if layout.start is not None:
            dst.narrow(0, layout.start, layout.total).add_(delta_rows)
        else:
            dst.add_(delta.index_select(0, layout.back_index))  # rows not computed add the zero row

    @staticmethod
    def _delta(plan: SegmentPlan, buckets: Buckets, layout: Layout, h_out: int, device):
        """The float32 delta buffer [total + 1, h_out] (last row zero), its computed rows [total, h_out]
        and each bucket's [G_b, T_b, h_out] part: views made once per plan, not on every call."""
        key = ("delta", buckets, h_out)  # the layout follows from the buckets
        if key not in plan.memo:
            delta = plan.buffer("delta", layout.total, h_out, device)
            parts, row = [], 0
            for groups, rows in layout.shapes:
                parts.append(delta.narrow(0, row, groups * rows).view(groups, rows, h_out))
                row += groups * rows
            plan.memo[key] = (delta, delta[:-1], parts)
        return plan.memo[key]

    def _weights(self, plan, buckets, lora_a_stack, lora_b_stack, ranks):
        """Per bucket: A copies [G_b, h_in, r_b] (a transposed view) and B copies [G_b, r_b, h_out]."""
        memo_key = ("slots", buckets)  # the slots follow from the buckets; their ranks are read anew
        if memo_key not in plan.memo:
            plan.memo[memo_key] = tuple(tuple(plan.slots[g] for g in members) for members, _ in buckets)
        slots = plan.memo[memo_key]
        slot_ranks = tuple(ranks[s] for bucket in slots for s in bucket)
        # Inference tensors have no version counter: such stacks are copied on every call.
        cacheable = not (lora_a_stack.is_inference() or lora_b_stack.is_inference())
        key = (slots, slot_ranks, id(lora_b_stack))
        if cacheable:
            key += (lora_a_stack._version, lora_b_stack._version)
            entry = self._cache.get(id(lora_a_stack))
            if entry is not None and entry.stacks[0] is lora_a_stack and entry.key == key:
                return entry.weights
        if max(slot_ranks) > min(lora_a_stack.shape[1], lora_b_stack.shape[1]):
            raise ValueError(f"lora_ranks {ranks} do not fit a stack of shape {tuple(lora_a_stack.shape)}")
        weights, nbytes = [], 0
        for bucket_slots, (_, r) in zip(slots, buckets, strict=True):
            r = min(r, lora_a_stack.shape[1])
            index = torch.tensor(bucket_slots, dtype=torch.long, device=lora_a_stack.device)
            a = lora_a_stack[:, :r].index_select(0, index)  # [G_b, r, h_in]
            b = lora_b_stack[:, :r].index_select(0, index)  # [G_b, r, h_out]
            for g, s in enumerate(bucket_slots):
                if ranks[s] < r:  # rows past a slot's rank are not part of its adapter (may hold anything)
                    a[g, ranks[s] :] = 0
                    b[g, ranks[s] :] = 0
            weights.append((a.transpose(1, 2), b))
            nbytes += a.nbytes + b.nbytes
        old = self._cache.pop(id(lora_a_stack), None)
        if old is not None:
            self._cached_bytes -= old.nbytes
        if cacheable and self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[id(lora_a_stack)] = _Copies((lora_a_stack, lora_b_stack), key, weights, nbytes)
            self._cached_bytes += nbytes
        return weights
