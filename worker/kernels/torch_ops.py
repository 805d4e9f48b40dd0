"""Fast CPU implementation of the LoRA gather-matmul ops: one torch matmul per slot group.

Semantics, layouts and argument names are those of `reference.py` (the spec); only the speed differs.
Rows are grouped by slot (bgmv) or taken as given segments (sgmv), and each group costs one matmul at
that slot's true rank `lora_ranks[s]`, so a rank-8 adapter never pays for the stack's `max_lora_rank`.
Python loops run over groups (few), never over tokens; index tensors become Python lists once per call.

Why the stacks are float32 on the CPU (`stack_dtype`): a small bf16 matmul (4x576 @ 576x16) costs
several times the same fp32 matmul on the CPU, because the CPU BLAS has no fast half-precision path for
such shapes; casting x to fp32 once per call is far cheaper than paying the bf16 penalty once per group.
The y intermediate is fp32 by spec anyway, and peft keeps LoRA weights in fp32 too, so fp32 stacks also
match the numbers users get from peft.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from worker.kernels.torch_grouped import GroupedLora

# A bgmv batch whose slots already form at most (distinct slots + this) runs is computed run by run in
# place; past that, one sort plus a gather/scatter of the rows (about four ops) is cheaper than the
# extra matmuls.
_MAX_EXTRA_RUNS = 4

# (p, q, s, r): rows [p, q) use slot s at rank r > 0.
Group = tuple[int, int, int, int]


def _check(inp: torch.Tensor, stack: torch.Tensor, y: torch.Tensor, in_dim: int, op: str) -> None:
    """Raise ValueError unless stack and y are float32 and the sizes of inp (x or y), stack, y agree."""
    if stack.dtype != torch.float32 or y.dtype != torch.float32:
        raise ValueError(f"{op}: stack and y must be float32 on CPU, got {stack.dtype} and {y.dtype}")
    if inp.shape[1] != stack.shape[in_dim] or y.shape[1] != stack.shape[1] or inp.shape[0] != y.shape[0]:
        raise ValueError(
            f"{op}: sizes disagree: input {tuple(inp.shape)}, stack {tuple(stack.shape)}, y {tuple(y.shape)}"
        )


def _check_out(out: torch.Tensor, num_rows: int, h_out: int, out_offset: int, op: str) -> None:
    """Raise ValueError unless out has num_rows rows and columns [out_offset, out_offset + h_out)."""
    if out.shape[0] != num_rows or not 0 <= out_offset <= out.shape[1] - h_out:
        raise ValueError(
            f"{op}: out {tuple(out.shape)} cannot take {num_rows} rows at columns "
            f"[{out_offset}, {out_offset + h_out})"
        )


def _groups(bounds: list[int], slots: list[int], ranks: list[int], num_rows: int, stack: torch.Tensor):
    """Non-empty groups with an adapter, from run/segment boundaries and their slots.

    Validates every index first: the group loops build views with as_strided, which does not check
    them against the tensors' sizes.
    """
    num_slots, max_lora_rank = stack.shape[0], stack.shape[1]
    if len(ranks) != num_slots or (ranks and not 0 <= min(ranks) <= max(ranks) <= max_lora_rank):
        raise ValueError(f"lora_ranks {ranks} do not fit a stack of shape {tuple(stack.shape)}")
    if slots and not 0 <= min(slots) <= max(slots) < num_slots:
        raise ValueError(f"slot ids range over [{min(slots)}, {max(slots)}], outside [0, {num_slots})")
    if len(bounds) != len(slots) + 1 or not 0 <= min(bounds) <= max(bounds) <= num_rows:
        raise ValueError(f"segment_indptr {bounds} does not fit {len(slots)} segments of {num_rows} rows")
    groups: list[Group] = []
    for g, s in enumerate(slots):
        p, q, r = bounds[g], bounds[g + 1], ranks[s]
        if r and q > p:
            groups.append((p, q, s, r))
    return groups


def _group_slots(slot_ids: torch.Tensor, ranks: list[int], num_rows: int, stack: torch.Tensor):
    """Group bgmv rows by slot: (order, groups), rows order[p:q] share a slot.

    order is None when the rows already form few enough runs to compute in place (groups then index
    the original rows); otherwise it is the stable argsort of slot_ids and groups index sorted rows.
    """
    if slot_ids.shape[0] != num_rows:
        raise ValueError(f"slot_ids has {slot_ids.shape[0]} entries for {num_rows} rows")
    run_slots, run_counts = torch.unique_consecutive(slot_ids, return_counts=True)
    slots = run_slots.tolist()
    if len(slots) <= len(set(slots)) + _MAX_EXTRA_RUNS:
        bounds = list(accumulate(run_counts.tolist(), initial=0))
        return None, _groups(bounds, slots, ranks, num_rows, stack)
    sorted_slots, order = torch.sort(slot_ids, stable=True)
    run_slots, run_counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    bounds = list(accumulate(run_counts.tolist(), initial=0))
    return order, _groups(bounds, run_slots.tolist(), ranks, num_rows, stack)


# The group loops below take each operand view with one as_strided call: on the CPU, tensor indexing
# such as A[s, :r].T costs more per index than the small matmul it feeds. Offsets are
# absolute storage offsets, so the inputs may themselves be views.


def _shrink_groups(xf: torch.Tensor, lora_a_stack: torch.Tensor, groups: list[Group], y: torch.Tensor):
    """y[p:q, :r] = xf[p:q] @ lora_a_stack[s, :r].T for each group; xf and y are float32."""
    h_in = lora_a_stack.shape[2]
    a_slot, a_row, a_col = lora_a_stack.stride()
    a_off = lora_a_stack.storage_offset()
    y_row, y_col = y.stride()
    y_off = y.storage_offset()
    for p, q, s, r in groups:
        a_t = lora_a_stack.as_strided((h_in, r), (a_col, a_row), a_off + s * a_slot)  # A[s, :r].T
        y_g = y.as_strided((q - p, r), (y_row, y_col), y_off + p * y_row)  # y[p:q, :r]
        torch.mm(xf[p:q], a_t, out=y_g)


def _expand_groups(
    y: torch.Tensor, lora_b_stack: torch.Tensor, groups: list[Group], out: torch.Tensor, out_offset: int
):
    """out[p:q, o:o+h_out] += y[p:q, :r] @ lora_b_stack[s, :r] per group, float32 sum rounded once."""
    if not groups:
        return
    h_out = lora_b_stack.shape[2]
    dst = None  # the half-precision rows to round the fp32 accumulator into at the end
    if out.dtype == torch.float32:
        acc, first_row, first_col = out, 0, out_offset
    else:
        # Half-precision out: accumulate the span of touched rows in fp32 and round once, as the spec
        # does. Rows inside the span without an adapter round-trip half -> fp32 -> half, which is exact.
        first_row, hi = min(g[0] for g in groups), max(g[1] for g in groups)
        dst = out[first_row:hi, out_offset : out_offset + h_out]  # [hi - first_row, h_out] view
        acc, first_col = dst.float(), 0
    b_slot, b_row, b_col = lora_b_stack.stride()
    b_off = lora_b_stack.storage_offset()
    y_row, y_col = y.stride()
    y_off = y.storage_offset()
    acc_row, acc_col = acc.stride()
    acc_off = acc.storage_offset() + first_col * acc_col - first_row * acc_row
    for p, q, s, r in groups:
        b = lora_b_stack.as_strided((r, h_out), (b_row, b_col), b_off + s * b_slot)  # B[s, :r]
        y_g = y.as_strided((q - p, r), (y_row, y_col), y_off + p * y_row)  # y[p:q, :r]
        acc.as_strided((q - p, h_out), (acc_row, acc_col), acc_off + p * acc_row).addmm_(y_g, b)
    if dst is not None:
        dst.copy_(acc)


class TorchLoraOps:
    """The four punica ops as grouped torch matmuls over float32 stacks (see the module docstring)."""

    # row_order groups decode rows by slot, so the CPU path gets contiguous segments (sgmv).
    decode_uses_segments = True
    # One stack per fused layer (qkv, gate_up): per-call overhead, not flops, dominates these matmuls.
    fuse_sub_modules = True

    def __init__(self):
        self.grouped = GroupedLora()

    def stack_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """float32 for every model dtype: small fp32 matmuls are far faster than bf16 ones on the CPU."""
        return torch.float32

    def row_order(self, slots: list[int], slot_lora_ranks: dict[int, int]) -> list[int]:
        """Sequences grouped by adapter slot (stable), so each adapter's rows form one segment, with the
        slots in order of LoRA rank, so that adapters of one rank are neighbours: the grouped sgmv
        (torch_grouped.py) runs each run of neighbouring segments in one rank bucket as one bmm pair."""
        return sorted(range(len(slots)), key=lambda i: (slot_lora_ranks.get(slots[i], 0), slots[i]))

    def bgmv_shrink(self, x, lora_a_stack, slot_ids, lora_ranks, y) -> None:
        """Semantics: y[i, :r] = x[i] @ lora_a_stack[s, :r].T  where s = slot_ids[i], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype. lora_a_stack: [num_slots, max_lora_rank, h_in] float32.
        slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32 (0 = row skipped).
        y: [num_tokens, max_lora_rank] float32, changed in place in columns < r only.
        """
        _check(x, lora_a_stack, y, 2, "bgmv_shrink")
        if x.shape[0] == 0:
            return
        order, groups = _group_slots(slot_ids, lora_ranks.tolist(), x.shape[0], lora_a_stack)
        if not groups:
            return
        # One cast per call: the stacks are fp32 (see stack_dtype), x arrives in the model dtype.
        if order is None:
            _shrink_groups(x.float(), lora_a_stack, groups, y)
            return
        xs = x.index_select(0, order).float()  # [num_tokens, h_in] rows sorted by slot
        ys = y.index_select(0, order)  # [num_tokens, max_lora_rank], keeps untouched columns as they were
        _shrink_groups(xs, lora_a_stack, groups, ys)
        y.index_copy_(0, order, ys)

    def bgmv_expand(self, y, lora_b_stack, slot_ids, lora_ranks, out, out_offset: int = 0) -> None:
        """Semantics: out[i, o:o+h_out] += y[i, :r] @ lora_b_stack[s, :r]  with s = slot_ids[i],
        r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_lora_rank] float32. lora_b_stack: [num_slots, max_lora_rank, h_out] float32.
        slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32 (0 = row untouched).
        out: [num_tokens, h_total] model dtype, changed in place in columns [o, o + h_out) of rows with
        an adapter (the sum is formed in float32 and rounded once).
        """
        _check(y, lora_b_stack, y, 1, "bgmv_expand")
        _check_out(out, y.shape[0], lora_b_stack.shape[2], out_offset, "bgmv_expand")
        if y.shape[0] == 0:
            return
        order, groups = _group_slots(slot_ids, lora_ranks.tolist(), y.shape[0], lora_b_stack)
        if order is None or not groups:
            _expand_groups(y, lora_b_stack, groups, out, out_offset)
            return
        h_out = lora_b_stack.shape[2]
        dst = out.narrow(1, out_offset, h_out)  # [num_tokens, h_out] view
        ys = y.index_select(0, order)  # [num_tokens, max_lora_rank] rows sorted by slot
        acc = dst.index_select(0, order).float()  # [num_tokens, h_out] fp32 accumulator
        _expand_groups(ys, lora_b_stack, groups, acc, 0)
        dst.index_copy_(0, order, acc.to(out.dtype))

    def sgmv_shrink(self, x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y) -> None:
        """Semantics: y[p:q, :r] = x[p:q] @ lora_a_stack[s, :r].T  for each segment g with rows
        [p, q) = segment_indptr[g:g+2], s = segment_slot_ids[g], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype. lora_a_stack: [num_slots, max_lora_rank, h_in] float32.
        segment_indptr: [num_segments + 1] int32 (non-decreasing, from 0; segments may be empty).
        segment_slot_ids: [num_segments] int32. lora_ranks: [num_slots] int32.
        y: [num_tokens, max_lora_rank] float32, changed in place in columns < r of each segment's rows.
        """
        _check(x, lora_a_stack, y, 2, "sgmv_shrink")
        bounds, slots, ranks = segment_indptr.tolist(), segment_slot_ids.tolist(), lora_ranks.tolist()
        groups = _groups(bounds, slots, ranks, x.shape[0], lora_a_stack)
        if groups:
            # One cast per call: the stacks are fp32 (see stack_dtype), x arrives in the model dtype.
            _shrink_groups(x.float(), lora_a_stack, groups, y)

    def sgmv_expand(
        self, y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset: int = 0
    ) -> None:
        """Semantics: out[p:q, o:o+h_out] += y[p:q, :r] @ lora_b_stack[s, :r]  for each segment g with
        rows [p, q), s = segment_slot_ids[g], r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_lora_rank] float32. lora_b_stack: [num_slots, max_lora_rank, h_out] float32.
        segment_indptr: [num_segments + 1] int32. segment_slot_ids: [num_segments] int32.
        out: [num_tokens, h_total] model dtype, changed in place (float32 sum, rounded once).
        """
        _check(y, lora_b_stack, y, 1, "sgmv_expand")
        _check_out(out, y.shape[0], lora_b_stack.shape[2], out_offset, "sgmv_expand")
        bounds, slots, ranks = segment_indptr.tolist(), segment_slot_ids.tolist(), lora_ranks.tolist()
        groups = _groups(bounds, slots, ranks, y.shape[0], lora_b_stack)
        _expand_groups(y, lora_b_stack, groups, out, out_offset)

    def sgmv_lora(
        self,
        x,
        lora_a_stack,
        lora_b_stack,
        segment_indptr,
        segment_slot_ids,
        lora_ranks,
        y,
        out,
        out_offset: int = 0,
    ) -> None:
        """Semantics: sgmv_shrink(x, lora_a_stack, ..., y) then sgmv_expand(y, lora_b_stack, ..., out,
        out_offset); y is scratch [num_tokens, max_lora_rank] float32 whose contents are left unspecified.

        Many short segments (decode) run as two batched matmuls over padded segments (torch_grouped.py);
        few or long ones (prefill) as one matmul per segment.
        """
        _check(x, lora_a_stack, y, 2, "sgmv_lora")
        _check(y, lora_b_stack, y, 1, "sgmv_lora")
        _check_out(out, x.shape[0], lora_b_stack.shape[2], out_offset, "sgmv_lora")
        plan = self.grouped.plan(segment_indptr, segment_slot_ids, x.shape[0])
        ranks = lora_ranks.tolist()
        if len(ranks) != lora_a_stack.shape[0]:
            raise ValueError(f"lora_ranks {ranks} do not fit a stack of shape {tuple(lora_a_stack.shape)}")
        buckets = self.grouped.buckets(plan, ranks)
        if buckets is None:  # one matmul per segment; the host lists are made once for both halves
            groups = _groups(plan.bounds, plan.slots, ranks, x.shape[0], lora_a_stack)
            _groups(plan.bounds, plan.slots, ranks, x.shape[0], lora_b_stack)  # checks B's rows too
            if groups:
                _shrink_groups(x.float(), lora_a_stack, groups, y)
                _expand_groups(y, lora_b_stack, groups, out, out_offset)
            return
        self.grouped.apply(plan, buckets, x, lora_a_stack, lora_b_stack, ranks, out, out_offset)
