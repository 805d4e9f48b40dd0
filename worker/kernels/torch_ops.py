"""Fast CPU implementation of the LoRA site op over the adapter pool: few torch calls per site.

Semantics are those of `reference.lora_site_ref` (the spec; arguments in `pool_args.py`); only the
speed differs. On this CPU a torch op costs ~5-10 us of dispatch, more than most LoRA matmuls of a
decode step, so what counts is the number of torch calls per site and step:

- many short segments (decode): the grouped path (`torch_grouped.py`), per rank bucket one shrink bmm
  over the concatenated A rows of every part of the site and one expand bmm per part, over padded
  copies gathered from the pool;
- long segments (prefill, `torch_segments.py`): per segment one shrink matmul over the adapter's A rows
  of every part, then one addmm per part into its columns.

The copies of both paths are cached across steps under one byte budget (`torch_copies.py`), keyed by
what they hold: the pool, the (layer, module) keys, the adapter handles and ranks. A placed adapter's
rows never change and a handle is never reused, so no entry can go stale.

Rows are taken as the given segments (`StepRows.use_segments`) or, for bgmv, as runs of one adapter,
sorted on the host when they interleave (`torch_plan.py`). Host-side decisions are memoized per
segmentation and per site rank signature; every index is validated on the host before a view is made.
Only row ids [:r] of an adapter's table are read: the pool is NaN past them (and NaN * 0 is NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.kernels.pool_args import PoolPart, StepRows
from worker.kernels.torch_copies import CopyCache
from worker.kernels.torch_grouped import GroupedLora
from worker.kernels.torch_plan import SegmentPlan, SiteShape
from worker.kernels.torch_segments import SegmentLora

_PLANS_KEPT = 4  # distinct segmentations remembered: a join step alternates two in every layer


def _check(x, a_view, parts: Sequence[PoolPart], rows: StepRows, out) -> None:
    """Raise ValueError naming the argument unless the shapes and dtypes fit (host-side reads only)."""
    if x.dim() != 2 or not x.is_floating_point() or x.shape[0] != rows.num_rows:
        raise ValueError(
            f"x: need [T = {rows.num_rows}, h_in] floating point, got {tuple(x.shape)} {x.dtype}"
        )
    if out.dim() != 2 or not out.is_floating_point() or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"out: need [T = {x.shape[0]}, h_out] floating point, got {tuple(out.shape)} {out.dtype}"
        )
    if a_view.dtype != torch.float32 or a_view.dim() != 2 or a_view.shape[1] != x.shape[1]:
        raise ValueError(
            f"a_view: need [rows, {x.shape[1]}] float32 (pool_dtype), got "
            f"{tuple(a_view.shape)} {a_view.dtype}"
        )
    num_adapters = len(rows.adapters)
    for i, p in enumerate(parts):
        if p.b_view.dtype != torch.float32 or p.b_view.dim() != 2:
            raise ValueError(f"parts[{i}].b_view: need [rows, h_out] float32, got {p.b_view.dtype}")
        if (
            p.a_rows.dim() != 2
            or p.a_rows.shape[0] != num_adapters
            or p.b_rows.shape != p.a_rows.shape
            or len(p.host_lora_ranks) != num_adapters
        ):
            raise ValueError(
                f"parts[{i}]: a_rows {tuple(p.a_rows.shape)}, b_rows {tuple(p.b_rows.shape)} and "
                f"{len(p.host_lora_ranks)} host_lora_ranks do not fit G = {num_adapters} adapters"
            )


class TorchLoraOps:
    """The pool's LoRA site op as grouped torch matmuls (see the module docstring)."""

    # row_order groups decode rows by adapter, so the CPU path gets contiguous segments.
    decode_uses_segments = True
    mixes_prompt_and_decode = False  # prompt rows take segment matmuls, decode rows the grouped bmm

    def __init__(self, cache_bytes: int = 1 << 30):
        self.cache = CopyCache(cache_bytes)  # the weight copies of both paths, one byte budget
        self.grouped = GroupedLora(self.cache)
        self.segments = SegmentLora(self.cache)
        self._plans: dict[tuple, SegmentPlan] = {}
        self._recent: list[tuple[StepRows, SegmentPlan]] = []  # the last two StepRows seen, held

    def pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """float32 for every model dtype: a small bf16 matmul (4x576 @ 576x16) costs several times the
        fp32 one on the CPU, whose BLAS has no fast half-precision path for such shapes, so casting x
        once per call beats paying that on every matmul. The x@A intermediate is float32 by spec anyway,
        and peft keeps LoRA weights in fp32 too, so the results match what users get from peft."""
        return torch.float32

    def row_order(self, adapters: list[int], adapter_lora_ranks: dict[int, int]) -> list[int]:
        """Sequences grouped by adapter slot (stable; 0 = no adapter), so each adapter's rows form one
        segment, with the slots in order of LoRA rank so that adapters of one rank are neighbours: the
        grouped path then reads the rows of each rank bucket in place, without gathers."""
        return sorted(
            range(len(adapters)), key=lambda i: (adapter_lora_ranks.get(adapters[i], 0), adapters[i])
        )

    def lora_site(
        self,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        rows: StepRows,
        out: torch.Tensor,
    ) -> None:
        """Semantics: for every part p, out[i, o_p:o_p+h_out_p] += (x[i] @ a_view[a_rows_p[g, :r]].T)
        @ b_view_p[b_rows_p[g, :r]] with g = rows.row_adapter[i], r = host_lora_ranks_p[g]; rows with
        g = -1 and parts with r = 0 are skipped (`reference.lora_site_ref`).

        x: [T, h_in] model dtype (float32, bfloat16 or float16). a_view: [num_rows(h_in), h_in] float32
        (`pool_dtype`). parts: the site's modules, disjoint output columns. rows: the adapter of each
        row, read from its host copies. out: [T, h_out_local] model dtype, updated in place; the delta
        is summed in float32 and rounded once. Entries the spec leaves alone keep their value (the
        grouped path may add +0.0 to some of them, which turns only a -0.0 into +0.0). Raises
        ValueError naming a bad argument.
        """
        _check(x, a_view, parts, rows, out)
        if not parts or rows.num_rows == 0:
            return
        plan = self._plan(rows)
        shape = plan.site(parts)
        if not shape.groups:
            return
        if shape.col_hi > out.shape[1]:
            raise ValueError(f"out: {out.shape[1]} columns, parts write up to column {shape.col_hi}")
        if plan.order is None:
            self._apply(plan, shape, x, a_view, parts, out, shape.col_lo)
            return
        # bgmv rows interleaving adapters: compute on rows sorted by adapter, then scatter them back.
        dst = out.narrow(1, shape.col_lo, shape.col_hi - shape.col_lo)  # [T, span] view
        acc = dst.index_select(0, plan.order).to(torch.float32)  # [T, span] float32, sorted rows
        self._apply(plan, shape, x.index_select(0, plan.order), a_view, parts, acc, 0)
        dst.index_copy_(0, plan.order, acc.to(out.dtype))

    def _apply(self, plan: SegmentPlan, shape: SiteShape, x, a_view, parts, out, col_base: int) -> None:
        """The site on rows in plan order; part k writes out's columns from col_base + columns[k]."""
        if shape.buckets is None:
            span = shape.col_hi - shape.col_lo
            whole = col_base == 0 and span == out.shape[1]
            dst = out if whole else out.narrow(1, col_base, span)  # [T, span]
            self.segments.apply(plan, shape, x, a_view, parts, dst)
        else:
            self.grouped.apply(plan, shape, x, a_view, parts, out, col_base)

    def _plan(self, rows: StepRows) -> SegmentPlan:
        """The plan of these rows: by identity for the StepRows of the last calls (every layer of a step
        passes the same one), else by value, so later steps with the same batch reuse it."""
        for seen, plan in self._recent:
            if seen is rows:
                return plan
        key = (rows.host_indptr, rows.host_segment_adapters, rows.adapters, rows.use_segments)
        plan = self._plans.get(key)
        if plan is None:
            plan = SegmentPlan.build(rows)
            if len(self._plans) >= _PLANS_KEPT:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan
        self._recent = [(rows, plan), *self._recent[:1]]
        return plan
