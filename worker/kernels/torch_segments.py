"""The CPU's LoRA site for long segments (prefill): per segment, one shrink for all the site's parts and
one addmm per part.

Per segment, the adapter's A rows of every part of the site, concatenated, make one shrink matmul, and
each part's B rows one addmm into its columns of a float32 accumulator. The rows are gathered from the
pool into a copy of the adapter's site at its true size, cached like the grouped path's copies
(`torch_copies.py`, the same byte budget): a prefill adapter usually goes on to decode, and the gathers
are several small torch ops per part, which cost about a tenth of a 512-row site call. When the budget
is spent the copy is gathered on every call instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.kernels.pool_args import PoolPart
from worker.kernels.torch_copies import CopyCache
from worker.kernels.torch_plan import SegmentPlan, SiteShape

# One adapter's site: (A^T [h_in, R] (a transposed view), ((part, first y column, rank, B [r, h_out]), ...)).
Copy = tuple[torch.Tensor, tuple[tuple[int, int, int, torch.Tensor], ...]]


class SegmentLora:
    """One matmul per segment and part, over cached copies of each adapter's rows."""

    def __init__(self, cache: CopyCache):
        self.cache = cache

    def apply(
        self,
        plan: SegmentPlan,
        shape: SiteShape,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        dst: torch.Tensor,
    ) -> None:
        """dst[p:q, part columns] += (x[p:q] @ A_g.T) @ B_g per segment and part (float32 sum, rounded
        once into dst's dtype). x: [num_rows, h_in]; dst: [num_rows, span], out's columns
        [col_lo, col_hi), both in the plan's row order."""
        # Each view op costs microseconds, so views are only made where needed.
        lo, hi = shape.groups[0][0], shape.groups[-1][1]
        all_rows = lo == 0 and hi == x.shape[0]
        xf = x if all_rows else x.narrow(0, lo, hi - lo)  # [hi - lo, h_in]: one cast for every segment
        if xf.dtype != torch.float32:
            xf = plan.scratch("x", hi - lo, x.shape[1], x.device).copy_(xf)
        acc = dst if all_rows else dst.narrow(0, lo, hi - lo)  # [hi - lo, span]
        half = None
        if acc.dtype != torch.float32:
            # Accumulate the touched rows in float32 and round once, as the spec does; rows inside the
            # span without a delta round-trip half -> float32 -> half, which is exact.
            half, acc = acc, plan.scratch("acc", hi - lo, dst.shape[1], x.device).copy_(acc)
        site = self.cache.open_site(a_view, parts)
        whole = len(shape.groups) == 1  # one segment: no row slices
        for (p, q, g), ranks in zip(shape.groups, shape.ranks, strict=True):

            def build(g=g, ranks=ranks):
                copy = _copy(a_view, parts, g, ranks)
                return copy, copy[0].nbytes + sum(b.nbytes for _, _, _, b in copy[1])

            a_t, b_parts = self.cache.fetch(site, ("segment", plan.handles[g], ranks), build)
            y = torch.mm(xf if whole else xf[p - lo : q - lo], a_t)  # [q - p, R] float32
            rows = acc if whole else acc.narrow(0, p - lo, q - p)
            if len(shape.widths) == 1:  # a one-part site: its part is the whole span, y its rank
                rows.addmm_(y, b_parts[0][3])
                continue
            for k, col, r, b in b_parts:
                rows.narrow(1, shape.columns[k], shape.widths[k]).addmm_(y.narrow(1, col, r), b)
        if half is not None:
            half.copy_(acc)


def _copy(a_view, parts: Sequence[PoolPart], g: int, ranks) -> Copy:
    """Adapter g's rows of this site, gathered: only its first r row ids per part (past them the tables
    hold PAD_ROW and the pool NaN)."""
    a_ids: list[int] = []
    b_parts = []
    for k, r in enumerate(ranks):
        if r:
            a_ids += parts[k].a_rows[g, :r].tolist()
            b = parts[k].b_view.index_select(0, parts[k].b_rows[g, :r].long())  # [r, h_out_k]
            b_parts.append((k, len(a_ids) - r, r, b))
    a = a_view.index_select(0, torch.tensor(a_ids, dtype=torch.long, device=a_view.device))  # [R, h_in]
    return a.t(), tuple(b_parts)
