"""Tensor-parallel context: which rank this process is, and the collectives the layers call.

Layers receive a `ParallelContext` instead of calling `torch.distributed` themselves, so shapes and
sharding can be built and tested for any rank without a process group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, length) of `rank`'s part when `size` rows are split as evenly as possible.

    The first `size % world_size` ranks hold one extra row, so sizes the world size does not divide
    (vocabularies, MLP widths) still shard.
    """
    base, extra = divmod(size, world_size)
    length = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, length


def check_head_split(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Raise ValueError unless the attention heads can be laid out over `world_size` ranks.

    Query heads split evenly, so they must divide. Key/value heads either split evenly too, or, with
    more ranks than KV heads, each is replicated on `world_size // num_kv_heads` ranks (`kv_head_shard`),
    so the world size must then be a multiple of the KV head count.
    """
    if num_heads % world_size:
        raise ValueError(
            f"{num_heads} attention heads do not divide across {world_size} tensor-parallel ranks"
        )
    if num_kv_heads >= world_size and num_kv_heads % world_size:
        raise ValueError(
            f"{num_kv_heads} key/value heads do not divide across {world_size} tensor-parallel ranks"
        )
    if num_kv_heads < world_size and world_size % num_kv_heads:
        raise ValueError(
            f"{world_size} tensor-parallel ranks are not a multiple of the {num_kv_heads} key/value heads "
            "(with more ranks than KV heads, each KV head is replicated on an equal number of ranks)"
        )


def kv_head_shard(num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first, count) of the key/value heads `rank` holds (`check_head_split` must have passed).

    With at least as many KV heads as ranks they split evenly. With more ranks (Llama-3-70B's 8 KV heads
    over 16 ranks) each rank holds one head, the one its query heads read: query heads split evenly, so
    rank r's queries all fall in KV group r // (world_size // num_kv_heads). Its k/v weights, LoRA rows
    and KV cache are then copies of its neighbours' (vLLM does the same).
    """
    if num_kv_heads >= world_size:
        count = num_kv_heads // world_size
        return rank * count, count
    return rank // (world_size // num_kv_heads), 1


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def shard(self, size: int) -> tuple[int, int]:
        return shard_range(size, self.rank, self.world_size)

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the key/value heads this rank holds (`kv_head_shard`)."""
        return kv_head_shard(num_kv_heads, self.rank, self.world_size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (on `device`: nccl reduces CUDA tensors only)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_gather_last_dim(self, t: torch.Tensor, full_size: int) -> torch.Tensor:
        """Concatenate each rank's `t` along the last dim; parts may differ in size by one row.

        Collectives need equal sizes, so each part is padded to the largest shard and trimmed after.
        """
        if self.world_size == 1:
            return t
        width = shard_range(full_size, 0, self.world_size)[1]
        if t.shape[-1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        trimmed = [p[..., : shard_range(full_size, r, self.world_size)[1]] for r, p in enumerate(parts)]
        return torch.cat(trimmed, dim=-1)


def init_parallel(
    rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device
) -> ParallelContext:
    """Join the process group of `world_size` ranks: gloo on CPU, nccl on CUDA."""
    if world_size == 1:
        return ParallelContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD)
