"""Attention over the paged KV cache: the native kernel where it is built, else torch SDPA.

Both read `ForwardBatch`'s tables of the step's sequences. The native kernel (`csrc/attention_cpu.cpp`)
reads the KV blocks in place for all rows in one call: decode rows always, prompt rows where it beats
SDPA in their dtype (`takes_prompts`). The torch path, the fallback elsewhere and the reference of the
engine tests, gathers each decode sequence's blocks into a padded tensor and runs one SDPA call per
prompt (grouped-query heads handled by SDPA itself).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker.forward_batch import ForwardBatch
from worker.kv_cache import blocks_for


class AttentionKernel(Protocol):
    def takes_prompts(self, dtype: torch.dtype) -> bool:
        """Whether prompt and chunk rows in `dtype` are faster here than in torch's SDPA."""
        ...

    def paged_attention(
        self, q, key_cache, value_cache, block_tables, query_starts, context_lens, scale, sliding_window
    ) -> torch.Tensor:
        """`reference.paged_attention_ref`: [T, H, D] from q [T, H, D] and the cache, through the tables."""
        ...


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        kernel: AttentionKernel | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.kernel = kernel

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        flat = (-1, self.num_kv_heads, self.head_dim)
        key_cache.view(flat).index_copy_(0, batch.slot_mapping, k)
        value_cache.view(flat).index_copy_(0, batch.slot_mapping, v)
        split = batch.num_prefill_tokens
        if self.kernel is None:
            out = self._torch(q, k, v, key_cache, value_cache, batch)
        elif not split or self.kernel.takes_prompts(q.dtype):
            out = self._native(q, key_cache, value_cache, *batch.attention_tables)
        else:  # prompt rows to SDPA, decode rows to the kernel
            parts = [self._prefill(q[:split], k[:split], v[:split], key_cache, value_cache, batch)]
            if split < q.shape[0]:
                parts.append(self._native(q[split:], key_cache, value_cache, *batch.decode_tables))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _native(self, q, key_cache, value_cache, block_tables, query_starts, context_lens) -> torch.Tensor:
        window = self.sliding_window or 0
        return self.kernel.paged_attention(
            q, key_cache, value_cache, block_tables, query_starts, context_lens, self.scale, window
        )

    def _torch(self, q, k, v, key_cache, value_cache, batch: ForwardBatch) -> torch.Tensor:
        split = batch.num_prefill_tokens
        parts = []  # [rows, H, D] each
        if split:
            parts.append(self._prefill(q[:split], k[:split], v[:split], key_cache, value_cache, batch))
        if split < q.shape[0]:
            parts.append(self._decode(q[split:], key_cache, value_cache, batch))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prefill(self, q, k, v, key_cache, value_cache, batch: ForwardBatch) -> torch.Tensor:
        """Each new sequence attends causally over its own rows; a continuing chunk also over the K/V
        its earlier chunks cached (read back from the cache, where this chunk's K/V were just written)."""
        outs, start = [], 0
        for i, (n, cached) in enumerate(zip(batch.query_lens, batch.prefix_lens, strict=True)):
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if cached:
                blocks = batch.block_tables[i, : blocks_for(cached + n, key_cache.shape[1])]
                ki, vi = (self._cached(c, blocks, cached + n) for c in (key_cache, value_cache))
            else:
                ki, vi = (
                    t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (k, v)
                )  # [1, H_kv, n, D]
            mask = self._prefill_mask(n, cached, q.device)
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
            outs.append(o.squeeze(0).transpose(0, 1))  # [n, H, D]
            start += n
        return torch.cat(outs)

    def _cached(self, cache: torch.Tensor, blocks: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` cached K (or V) of one sequence: [1, H_kv, num_tokens, D]."""
        flat = cache.index_select(0, blocks).view(-1, self.num_kv_heads, self.head_dim)  # [span, H_kv, D]
        return flat[:num_tokens].transpose(0, 1).unsqueeze(0)

    def _prefill_mask(self, n: int, cached: int, device: torch.device) -> torch.Tensor | None:
        """[n, cached + n] bool, True where query row i (position cached + i) may attend; None where
        SDPA's own causal mask is exact (no cached prefix, no sliding window in reach)."""
        window = self.sliding_window
        if not cached and (window is None or n <= window):
            return None
        q_pos = torch.arange(cached, cached + n, device=device)[:, None]
        k_pos = torch.arange(cached + n, device=device)[None, :]
        dist = q_pos - k_pos
        mask = dist >= 0
        if window is not None:
            mask &= dist < window
        return mask

    def _decode(self, q, key_cache, value_cache, batch: ForwardBatch) -> torch.Tensor:
        first = batch.num_prefill_seqs
        tables = batch.block_tables[first:, : batch.max_decode_blocks]  # [num_seqs, max_blocks]
        num_seqs, max_blocks = tables.shape
        span = max_blocks * key_cache.shape[1]
        # Gather each sequence's blocks into one padded [num_seqs, H_kv, span, D] view for a single SDPA
        # call. index_select copies whole blocks, far faster than advanced indexing (cache[tables]).
        blocks = tables.reshape(-1)
        shape = (num_seqs, span, self.num_kv_heads, self.head_dim)
        keys = key_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        values = value_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [num_seqs, H, 1, D]
            keys,
            values,
            attn_mask=self._decode_mask(batch, span),
            scale=self.scale,
            enable_gqa=True,
        )
        return o.squeeze(2)  # [num_seqs, H, D]

    def _decode_mask(self, batch: ForwardBatch, span: int) -> torch.Tensor:
        """[num_seqs, 1, 1, span] bool, True where a sequence may attend; made once per step."""
        key = ("decode", self.sliding_window)
        if key not in batch.masks:
            lens = batch.context_lens[batch.num_prefill_seqs :, None]  # [num_seqs, 1]
            pos = torch.arange(span, device=lens.device)[None, :]
            mask = pos < lens  # [num_seqs, span]
            if self.sliding_window is not None:
                mask &= pos >= lens - self.sliding_window
            batch.masks[key] = mask[:, None, None, :]
        return batch.masks[key]
