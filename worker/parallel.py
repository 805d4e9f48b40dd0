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


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def shard(self, size: int) -> tuple[int, int]:
        return shard_range(size, self.rank, self.world_size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

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
