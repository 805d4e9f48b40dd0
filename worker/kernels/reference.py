"""Plain reference implementations of the LoRA gather-matmul ops (punica semantics).

These are the specification: per-row / per-segment Python loops in float32 that are obviously right.
The fast CPU path (`torch_ops.py`) and the CUDA kernels (`csrc/`, `cuda.py`) must match them; tests
compare every implementation against these functions.

Layouts shared by every implementation (names are the same in Python, CUDA and the proto):

- `lora_a_stack`: [num_slots, max_lora_rank, h_in]  model dtype; slot s holds adapter s's A (rank rows used)
- `lora_b_stack`: [num_slots, max_lora_rank, h_out] model dtype; slot s holds adapter s's B^T with the
  LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA) already folded in
- `lora_ranks`:   [num_slots] int32; the true rank of each slot. Rank 0 means "no adapter": rows that
  map to such a slot are skipped entirely (no compute, their outputs untouched)
- `slot_ids`:     [num_tokens] int32 (bgmv); the slot of each row
- `segment_indptr`: [num_segments + 1] int32 (sgmv); rows segment_indptr[g]:segment_indptr[g+1]
  form segment g (segments may be empty); `segment_slot_ids`: [num_segments] int32
- the shrink output / expand input `y`: [num_tokens, max_lora_rank] float32, so the x@A intermediate is
  never rounded to half precision (peers lost accuracy doing that)

Only the first r = lora_ranks[slot] rows of a slot's A and B are read, so adapters of different ranks
share one launch and none pays for the largest rank's compute.
"""

from __future__ import annotations

import torch


def bgmv_shrink_ref(
    x: torch.Tensor,
    lora_a_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    lora_ranks: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Semantics: y[i, :r] = x[i] @ lora_a_stack[s, :r].T  where s = slot_ids[i], r = lora_ranks[s].

    x: [num_tokens, h_in] model dtype. lora_a_stack: [num_slots, max_lora_rank, h_in].
    slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32.
    y: [num_tokens, max_lora_rank] float32, written in place for columns < r only.
    """
    for i in range(x.shape[0]):
        s = int(slot_ids[i])
        r = int(lora_ranks[s])
        if r == 0:
            continue
        y[i, :r] = x[i].float() @ lora_a_stack[s, :r].float().T


def bgmv_expand_ref(
    y: torch.Tensor,
    lora_b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    lora_ranks: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Semantics: out[i, o:o+h_out] += y[i, :r] @ lora_b_stack[s, :r]  (s = slot_ids[i], r = lora_ranks[s]).

    y: [num_tokens, max_lora_rank] float32. lora_b_stack: [num_slots, max_lora_rank, h_out].
    out: [num_tokens, h_total] model dtype, updated in place (the sum is formed in float32 and rounded
    once); o = out_offset lets one call write a slice of a fused output (qkv, gate_up).
    """
    h_out = lora_b_stack.shape[2]
    for i in range(y.shape[0]):
        s = int(slot_ids[i])
        r = int(lora_ranks[s])
        if r == 0:
            continue
        delta = y[i, :r].float() @ lora_b_stack[s, :r].float()
        dst = out[i, out_offset : out_offset + h_out]
        dst.copy_((dst.float() + delta).to(out.dtype))


def sgmv_shrink_ref(
    x: torch.Tensor,
    lora_a_stack: torch.Tensor,
    segment_indptr: torch.Tensor,
    segment_slot_ids: torch.Tensor,
    lora_ranks: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Semantics: for each segment g with rows [p, q) = segment_indptr[g:g+2], slot s = segment_slot_ids[g]:
    y[p:q, :r] = x[p:q] @ lora_a_stack[s, :r].T  with r = lora_ranks[s].

    x: [num_tokens, h_in]. segment_indptr: [num_segments + 1] int32 (non-decreasing, starts at 0).
    segment_slot_ids: [num_segments] int32. y: [num_tokens, max_lora_rank] float32, columns < r written.
    """
    for g in range(segment_slot_ids.shape[0]):
        p, q = int(segment_indptr[g]), int(segment_indptr[g + 1])
        s = int(segment_slot_ids[g])
        r = int(lora_ranks[s])
        for i in range(p, q):
            if r:
                y[i, :r] = x[i].float() @ lora_a_stack[s, :r].float().T


def sgmv_expand_ref(
    y: torch.Tensor,
    lora_b_stack: torch.Tensor,
    segment_indptr: torch.Tensor,
    segment_slot_ids: torch.Tensor,
    lora_ranks: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Semantics: for each segment g with rows [p, q) and slot s = segment_slot_ids[g]:
    out[p:q, o:o+h_out] += y[p:q, :r] @ lora_b_stack[s, :r]  with r = lora_ranks[s], o = out_offset.

    y: [num_tokens, max_lora_rank] float32. out: [num_tokens, h_total] model dtype, updated in place
    (float32 sum, rounded once).
    """
    h_out = lora_b_stack.shape[2]
    for g in range(segment_slot_ids.shape[0]):
        p, q = int(segment_indptr[g]), int(segment_indptr[g + 1])
        s = int(segment_slot_ids[g])
        r = int(lora_ranks[s])
        for i in range(p, q):
            if r:
                delta = y[i, :r].float() @ lora_b_stack[s, :r].float()
                dst = out[i, out_offset : out_offset + h_out]
                dst.copy_((dst.float() + delta).to(out.dtype))


def sgmv_lora_ref(
    x: torch.Tensor,
    lora_a_stack: torch.Tensor,
    lora_b_stack: torch.Tensor,
    segment_indptr: torch.Tensor,
    segment_slot_ids: torch.Tensor,
    lora_ranks: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Semantics: the shrink then the expand of each segment, through a float32 intermediate:
    out[p:q, o:o+h_out] += (x[p:q] @ lora_a_stack[s, :r].T) @ lora_b_stack[s, :r]  (float32 sum, rounded
    once). Implementations take a scratch y [num_tokens, max_lora_rank] float32 and leave it unspecified.
    """
    y = torch.zeros(x.shape[0], lora_a_stack.shape[1], dtype=torch.float32)
    sgmv_shrink_ref(x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y)
    sgmv_expand_ref(y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset)


def lora_pool_ref(
    x: torch.Tensor,
    pool_a_view: torch.Tensor,
    pool_b_view: torch.Tensor,
    row_adapter: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    lora_ranks: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Semantics: out[i, o:o+h_out] += (x[i] @ pool_a_view[a_rows[g, :r]].T) @ pool_b_view[b_rows[g, :r]]
    with g = row_adapter[i] (g = -1: no adapter, the row is skipped), r = lora_ranks[g] (r = 0: adapter g
    does not target this module, skipped), o = out_offset.

    The LoRA ops over the adapter pool (`worker/lora/pool.py`): an adapter's rows are wherever the pool
    put them, one row id per rank row, instead of a slot of a max-rank stack.

    x: [num_tokens, h_in] model dtype. pool_a_view: [num_rows_a, h_in] (`AdapterPool.view(h_in)`) and
    pool_b_view: [num_rows_b, h_out] (`AdapterPool.view(h_out)`, rows of B^T with the scale folded in),
    pool dtype; every row not in use is NaN. row_adapter: [num_tokens] int32 in [-1, G).
    a_rows, b_rows: [G, R_max] int32 row ids (`StepTables.for_key`); entries [g, j] with j >= r are
    padding and are never read. lora_ranks: [G] int32, each <= R_max.
    out: [num_tokens, h_total] model dtype, updated in place: columns [o, o + h_out) of the rows with an
    adapter that targets the module; everything else untouched.

    Rounding as `sgmv_lora_ref`: the x@A intermediate stays float32 (never rounded to the model dtype),
    the delta is added to out in float32 and rounded once. Implementations may take a float32 scratch
    y [num_tokens, R_max] for the intermediate and leave it unspecified.
    """
    h_out = pool_b_view.shape[1]
    for i in range(x.shape[0]):
        g = int(row_adapter[i])
        r = int(lora_ranks[g]) if g >= 0 else 0
        if r == 0:
            continue
        a = pool_a_view[a_rows[g, :r].long()].float()  # [r, h_in]
        b_t = pool_b_view[b_rows[g, :r].long()].float()  # [r, h_out]
        delta = (x[i].float() @ a.T) @ b_t  # [h_out] float32
        dst = out[i, out_offset : out_offset + h_out]
        dst.copy_((dst.float() + delta).to(out.dtype))
