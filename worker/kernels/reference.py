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


def paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """Semantics: sequence s owns the query rows [query_starts[s], query_starts[s + 1]) of q, n_s of them
    (1: a decode row; a prompt or a chunk's length; 0: nothing). Row i of s is at position
    p = context_lens[s] - n_s + i and attends to the keys at positions k <= p with
    (sliding_window == 0 or k > p - sliding_window):
        out[row, h] = softmax_k(scale * q[row, h] . K[k, h // G]) @ V[k, h // G],  G = H // H_kv (GQA),
    where key position k of s lives at key_cache[block_tables[s, k // block_size], k % block_size].

    q: [T, H, D] float32 / bfloat16 / float16. key_cache, value_cache: [num_blocks, block_size, H_kv, D],
    q's dtype, holding this step's K/V already. block_tables: [S, max_blocks] int32; entries past
    ceil(context_lens[s] / block_size) are padding, never read. query_starts: [S + 1] int32,
    non-decreasing, from 0 to T. context_lens: [S] int32, each sequence's cached tokens including this
    step's rows. Returns out [T, H, D] in q's dtype: float32 scores, softmax and accumulation, rounded once.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim)  # [T, H, D] float32
    for s in range(context_lens.shape[0]):
        start, end, ctx = int(query_starts[s]), int(query_starts[s + 1]), int(context_lens[s])
        if end == start:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)].long()
        # [ctx, H, D] float32: the sequence's keys and values, each kv head repeated for its G query heads
        k, v = (
            c[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float().repeat_interleave(group, dim=1)
            for c in (key_cache, value_cache)
        )
        for i in range(end - start):
            p = ctx - (end - start) + i
            lo = max(0, p - sliding_window + 1) if sliding_window else 0
            scores = torch.einsum("hd,khd->hk", q[start + i].float(), k[lo : p + 1]) * scale  # [H, keys]
            out[start + i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[lo : p + 1])
    return out.to(q.dtype)


# ---- the fused small ops of a decoder layer (`csrc/fused_cpu.cpp`): HF's ops, with HF's rounding ----------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics: weight * rms_norm(x) as HF Llama rounds it: x * rsqrt(mean(x^2) + eps) in float32, cast
    to the model dtype, then the weight multiplies in the model dtype. x: [T, h]; weight: [h]."""
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: s = x + residual (rounded to the model dtype, HF's residual add), then
    (rms_norm_ref(s), s). x, residual: [T, h]; weight: [h]."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Semantics: silu(gate) * up for gate, up = gate_up[:, :I], gate_up[:, I:] (HF's MLP on the fused
    gate_up output): silu in float32 rounded to the model dtype, then the product rounded.
    gate_up: [T, 2I] -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Semantics: x * cos + rotate_half(x) * sin (HF's rotate-half convention), each product and the sum
    rounded to the model dtype as torch's ops round them. x: [T, heads, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_cos_sin_ref(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: emb = positions * inv_freq (float32) repeated twice along the last dimension; cos, sin =
    (cos(emb) * scaling, sin(emb) * scaling) in float32, cast to `dtype`. positions: [T] int64; inv_freq:
    [D / 2] float32 -> cos, sin: [T, 1, D]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)
