"""The physical paged KV cache: fixed-size blocks, addressed by flat slot = block * block_size + offset.

Which blocks a sequence owns is decided by the caller (the router's block manager); this module only
holds the tensors and says how many blocks fit a memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


@dataclass
class KVCache:
    block_size: int
    key_caches: list[torch.Tensor]  # per layer: [num_blocks, block_size, num_kv_heads_local, head_dim]
    value_caches: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, device) -> KVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(
            block_size=block_size,
            key_caches=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            value_caches=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        per_block = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block ({per_block} bytes each)")
        return num_blocks

    @property
    def num_blocks(self) -> int:
        return self.key_caches[0].shape[0]
