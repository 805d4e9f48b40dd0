"""The CPU's LoRA site for many short segments (decode): per rank bucket, one shrink bmm for all the
site's parts and one expand bmm per part, whatever the number of adapters.

With one matmul per segment and part, a decode batch of 32 rows over 8 adapters costs dozens of small
matmuls per q/k/v site, each dominated by its dispatch (~5-10 us per torch op on the CPU): thousands of
calls per step on a 30-layer model, whatever the flops. Here the site's segments whose adapters share
a rank bucket in every part (`torch_plan.py`) run together, each padded to the bucket's longest. When
the segments are contiguous and of equal length (no padding), x and out are used in place instead of
gathered.

`bmm` needs every segment's weights at one shape, so each bucket's adapters' pool rows are gathered
into padded copies:

- A: [G_b, R_b, h_in], adapter m's rows per part p at [off_p, off_p + r_p), zeros up to off_p + R_p
  (R_p: the bucket's rank for p, R_b = sum of them): one shrink covers every part;
- B_p: [G_b, R_p, h_out_p] per part, zeros past each adapter's rank; its expand reads y's columns
  [off_p, off_p + R_p) into a contiguous float32 delta_p (a strided bmm out runs batch by batch, at
  twice the cost), added into p's columns of out.

Not one block-diagonal B over the site's columns (one expand for every part, as the stacks had): at
decode a site's time goes mostly to reading its copies, and a block-diagonal q/k/v B is 3 times the true
size (gate/up 2). Per-part copies made a step of 64 rows over 8 rank-8 adapters about 10% faster here,
and keep a batch of 32 adapters of ranks 4-64 within the default 1 GiB cache (0.9 GiB; block-diagonal:
1.3 GiB, so rebuilt every step). The copies are the adapters' true size up to rank padding, as the pool.

Only row ids [:r] of each adapter's table are read: past a rank the table holds PAD_ROW and the pool
NaN. A decode batch keeps its adapters for many steps, so the copies are cached (`torch_copies.py`)
per bucket, keyed by what they hold: a request joining or leaving rebuilds only its bucket's copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.kernels.pool_args import PoolPart
from worker.kernels.torch_copies import CopyCache
from worker.kernels.torch_plan import Bucket, SegmentPlan, SiteShape

# Per bucket: (A^T [G_b, h_in, R_b] (a transposed view), ((part index, B_p [G_b, R_p, h_out_p]), ...)).
Copies = tuple[torch.Tensor, tuple[tuple[int, torch.Tensor], ...]]


class GroupedLora:
    """Fused shrink + per-part expand over padded segments, with cached per-batch weight copies."""

    def __init__(self, cache: CopyCache):
        self.cache = cache

    def apply(
        self,
        plan: SegmentPlan,
        shape: SiteShape,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        out: torch.Tensor,
        col_base: int,
    ) -> None:
        """out[p:q, part columns] += (x[p:q] @ A_g.T) @ B_g per part, for every segment of
        `shape.buckets` (float32 sum, rounded once into out's dtype). x: [num_rows, h_in] and out in the
        plan's row order; part k's columns start at col_base + shape.columns[k]."""
        layout = plan.layout(shape, x.device)
        site = self.cache.open_site(a_view, parts)
        weights, host = [], []
        for bucket, content in zip(shape.buckets, shape.contents, strict=True):

            def build(bucket=bucket):
                copies = _copies(shape, bucket, a_view, parts, host)
                return copies, copies[0].nbytes + sum(b.nbytes for _, b in copies[1])

            weights.append(self.cache.fetch(site, content, build))
        # Each op here costs as much as the small matmuls, so views are only made where needed.
        if layout.start is None:
            x_rows = x.index_select(0, layout.pad_index)  # [total, h_in]
        else:
            x_rows = x if layout.whole else x.narrow(0, layout.start, layout.total)
        x_rows = x_rows.to(torch.float32)
        deltas, per_bucket = _buffers(plan, shape, layout, x.device)
        row, single = 0, len(layout.shapes) == 1
        for (groups, rows), (a, b_parts), (y, expands) in zip(
            layout.shapes, weights, per_bucket, strict=True
        ):
            x_pad = x_rows if single else x_rows.narrow(0, row, groups * rows)
            torch.bmm(x_pad.reshape(groups, rows, -1), a, out=y)  # [G_b, T_b, R_b] float32
            for (_, b), (y_p, delta_p) in zip(b_parts, expands, strict=True):
                torch.bmm(y_p, b, out=delta_p)  # [G_b, T_b, h_out_p]: contiguous (a strided out is slow)
            row += groups * rows
        # In-place add of a float32 delta into a half-precision out sums in float32, rounded once.
        for k, delta, delta_rows in deltas:
            col, width = col_base + shape.columns[k], shape.widths[k]
            dst = out if col == 0 and width == out.shape[1] else out.narrow(1, col, width)
            if layout.start is None:
                dst.add_(delta.index_select(0, layout.back_index))  # rows not computed add the zero row
            elif layout.whole:
                dst.add_(delta_rows)
            else:
                dst.narrow(0, layout.start, layout.total).add_(delta_rows)


def _buffers(plan: SegmentPlan, shape: SiteShape, layout, device):
    """The float32 scratch of a site shape: per targeted part k, (k, delta_k [total + 1, h_out_k] (last
    row zero), its computed rows [total, h_out_k]); per bucket y [G_b, T_b, R_b] with, per part it
    targets, (y's columns [off_p, off_p + R_p), the bucket's rows of delta_k). Made once per plan and
    shared by every site shape that writes the same regions (every layer's site of one kind): each call
    overwrites what it reads, and rows no bucket writes stay zero."""
    if shape.buffers is None:
        key = (layout.shapes, tuple(b.part_ranks for b in shape.buckets), shape.widths)
        if key not in plan.buffers:
            plan.buffers[key] = _make_buffers(shape, layout, device)
        shape.buffers = plan.buffers[key]
    return shape.buffers


def _make_buffers(shape: SiteShape, layout, device):
    targeted = sorted({k for b in shape.buckets for k, r_p in enumerate(b.part_ranks) if r_p})
    deltas = {
        k: torch.zeros(layout.total + 1, shape.widths[k], dtype=torch.float32, device=device)
        for k in targeted
    }
    per_bucket, row = [], 0
    for bucket, (groups, rows) in zip(shape.buckets, layout.shapes, strict=True):
        y = torch.empty(groups, rows, bucket.lora_rank, dtype=torch.float32, device=device)
        expands, off = [], 0
        for k, r_p in enumerate(bucket.part_ranks):
            if r_p:
                d = deltas[k].narrow(0, row, groups * rows).view(groups, rows, shape.widths[k])
                expands.append((y.narrow(2, off, r_p), d))
                off += r_p
        per_bucket.append((y, tuple(expands)))
        row += groups * rows
    return tuple((k, d, d[:-1]) for k, d in deltas.items()), tuple(per_bucket)


def _copies(shape: SiteShape, bucket: Bucket, a_view, parts: Sequence[PoolPart], host: list) -> Copies:
    """One bucket's padded copies (module docstring), gathered from the pool: one index_select and one
    index_copy_ per view, from host row lists of each adapter's first r row ids. host: the tables as
    host lists, filled by the first bucket of a call that needs them."""
    num, r_b = len(bucket.members), bucket.lora_rank
    a_src: list[int] = []
    a_dst: list[int] = []
    b_src: list[list[int]] = [[] for _ in parts]
    b_dst: list[list[int]] = [[] for _ in parts]
    if not host:
        host += [p.a_rows.tolist() for p in parts], [p.b_rows.tolist() for p in parts]  # [P][G][R_max]
    a_host, b_host = host
    for m, i in enumerate(bucket.members):
        g, off = shape.groups[i][2], m * r_b
        for k, (r, r_p) in enumerate(zip(shape.ranks[i], bucket.part_ranks, strict=True)):
            if r:  # only the first r row ids: past them are PAD_ROW and NaN rows
                a_src += a_host[k][g][:r]
                b_src[k] += b_host[k][g][:r]
                a_dst += range(off, off + r)
                b_dst[k] += range(m * r_p, m * r_p + r)
            off += r_p

    def index(values):
        return torch.tensor(values, dtype=torch.long, device=a_view.device)

    a = torch.zeros(num * r_b, a_view.shape[1], dtype=torch.float32, device=a_view.device)
    a.index_copy_(0, index(a_dst), a_view.index_select(0, index(a_src)))
    b_parts = []
    for k, r_p in enumerate(bucket.part_ranks):
        if r_p:
            view = parts[k].b_view
            b = torch.zeros(num * r_p, view.shape[1], dtype=torch.float32, device=a_view.device)
            b.index_copy_(0, index(b_dst[k]), view.index_select(0, index(b_src[k])))
            b_parts.append((k, b.view(num, r_p, view.shape[1])))
    return a.view(num, r_b, -1).transpose(1, 2), tuple(b_parts)
