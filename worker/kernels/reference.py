"""Plain reference implementations of the LoRA gather-matmul ops over the adapter pool (punica semantics).

These are the specification: per-row Python loops in float32 that are obviously right. The fast CPU path
(`torch_ops.py`) and the CUDA kernels (`csrc/`, `cuda.py`) must match them; tests compare every
implementation against these functions. Layouts: the pool and its row tables in `worker/lora/pool.py`,
the per-call arguments in `pool_args.py`. Only the first r = lora_ranks[g] row ids of an adapter's table
are read, so adapters of different ranks share one call and none pays for the largest rank's compute;
the x@A intermediate stays float32 (peers lost accuracy rounding it to half precision).
"""

from __future__ import annotations

import torch


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


def lora_site_ref(x: torch.Tensor, a_view: torch.Tensor, parts, rows, out: torch.Tensor) -> None:
    """Semantics: `lora_pool_ref` for each part of a LoRA site (`worker/kernels/pool_args.py`):
    out[i, o_p:o_p+h_out_p] += (x[i] @ a_view[a_rows_p[g, :r]].T) @ b_view_p[b_rows_p[g, :r]]
    with g = rows.row_adapter[i], r = lora_ranks_p[g], for every part p. Parts write disjoint columns,
    so their order does not matter. x: [num_tokens, h_in]; a_view: [num_rows_a, h_in]."""
    for p in parts:
        lora_pool_ref(
            x, a_view, p.b_view, rows.row_adapter, p.a_rows, p.b_rows, p.lora_ranks, out, p.out_offset
        )
