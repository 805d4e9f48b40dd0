"""One adapter's factors on one rank, packed as the pool stores them: one block of rows per row width.

An adapter has an A and a B^T factor for each (layer, module) it targets, a few hundred small tensors.
Packed, they are at most one tensor per row width of the pool (`worker/lora/pool.py`), in the order the
pool hands out rows (keys sorted; for each key its A rows, then its B^T rows, each in the block of its
width), so that:
- placing an adapter in the pool is one scatter per width, not two per module, on the step thread;
- reading it back (an eviction into the host tier) is one gather per width;
- handing it from the loader process to the worker is a few shared-memory tensors, not hundreds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

Key = tuple[int, str]  # (layer, module), e.g. (3, "q_proj")


@dataclass(frozen=True)
class ModuleFactors:
    """One (layer, module)'s LoRA factors on this rank, as the ops want them."""

    a: torch.Tensor  # [r, h_in_local]
    b_t: torch.Tensor  # [r, h_out_local]: B transposed, with the LoRA scale folded in


@dataclass(frozen=True)
class FactorPlace:
    """Where one (layer, module)'s rows are in the blocks: A rows [a_offset, a_offset + rank) of
    blocks[a_width], B^T rows [b_offset, b_offset + rank) of blocks[b_width]."""

    key: Key
    rank: int
    a_width: int
    a_offset: int
    b_width: int
    b_offset: int


@dataclass(frozen=True)
class PackedFactors:
    blocks: dict[int, torch.Tensor]  # width -> [rows of that width, width], all in one dtype
    places: tuple[FactorPlace, ...]  # sorted by key: the order the rows are in

    @classmethod
    def pack(cls, factors: Mapping[Key, ModuleFactors], dtype: torch.dtype | None = None) -> PackedFactors:
        """`factors` in blocks of `dtype` (default: their own). ValueError for a factor that is not a
        pair a [r, h_in], b_t [r, h_out] with r >= 1."""
        places, counts = [], {}
        for key in sorted(factors):
            a, b_t = factors[key].a, factors[key].b_t
            if a.dim() != 2 or b_t.dim() != 2 or a.shape[0] != b_t.shape[0] or a.shape[0] == 0:
                raise ValueError(
                    f"{key}: need a [r, h_in] and b_t [r, h_out] with r >= 1: "
                    f"{tuple(a.shape)}, {tuple(b_t.shape)}"
                )
            r, a_w, b_w = a.shape[0], a.shape[1], b_t.shape[1]
            a_off = counts.get(a_w, 0)
            counts[a_w] = a_off + r
            b_off = counts.get(b_w, 0)
            counts[b_w] = b_off + r
            places.append(FactorPlace(key, r, a_w, a_off, b_w, b_off))
        if dtype is None:
            dtype = next(iter(factors.values())).a.dtype if factors else torch.float32
        blocks = {w: torch.empty(n, w, dtype=dtype) for w, n in sorted(counts.items())}  # [rows_w, w]
        packed = cls(blocks, tuple(places))
        for p in places:
            f = factors[p.key]
            packed.a_of(p).copy_(f.a)
            packed.b_t_of(p).copy_(f.b_t)
        return packed

    def a_of(self, p: FactorPlace) -> torch.Tensor:
        return self.blocks[p.a_width][p.a_offset : p.a_offset + p.rank]  # [r, a_width], a view

    def b_t_of(self, p: FactorPlace) -> torch.Tensor:
        return self.blocks[p.b_width][p.b_offset : p.b_offset + p.rank]  # [r, b_width], a view

    def factors(self) -> dict[Key, ModuleFactors]:
        """Each (layer, module)'s factors, as views into the blocks."""
        return {p.key: ModuleFactors(self.a_of(p), self.b_t_of(p)) for p in self.places}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks.values())

    def demand(self) -> dict[int, int]:
        """width -> rows the pool must hand out for these factors."""
        return {w: b.shape[0] for w, b in self.blocks.items()}

    def pinned(self) -> PackedFactors:
        """A page-locked copy, so that copying it to a GPU is asynchronous."""
        return PackedFactors({w: b.pin_memory() for w, b in self.blocks.items()}, self.places)
