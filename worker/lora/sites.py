"""LoRA sites: where one base linear layer of one rank applies LoRA, and how an adapter's factors are cut
for it.

A site is one input x and the modules that read it: q/k/v of the fused qkv layer, gate/up, or a single
o or down. Each module (a part) writes its own columns of the layer's local output. The adapter's rows
live in the pool (`worker/lora/pool.py`), keyed by (layer, module); the site only knows the keys, the
shards and the columns, so the LoRA ops can run a whole site in one call (one shrink over the parts'
concatenated A rows where an implementation fuses).

Tensor parallel: the factors are sharded the way the base weight is. A column-parallel base (q/k/v/
gate/up, output sharded) keeps A whole and B's output rows for this rank; a row-parallel base (o/down,
input sharded) keeps A's input columns for this rank and B whole. Then x@A@B on each rank is exactly that
rank's share of the base layer's output, so LoRA adds no collective of its own: the column case needs
none, and the row case rides on the base layer's all-reduce (the partial deltas sum to the full delta).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.lora.packed import Key, ModuleFactors


@dataclass(frozen=True)
class LoraPart:
    """One module of a site."""

    module: str  # q_proj, k_proj, ...
    in_shard: tuple[int, int] | None  # (start, length) of A's columns kept on this rank, None = all
    out_shard: tuple[int, int] | None  # (start, length) of B's rows kept on this rank, None = all
    column: int  # first column of this part in the layer's local output
    width: int  # columns of this part (h_out on this rank)


@dataclass(frozen=True)
class LoraSite:
    """One base linear layer's LoRA on this rank."""

    layer: int
    parts: tuple[LoraPart, ...]
    h_in: int  # A's columns on this rank: the width of the site's A rows in the pool

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple((self.layer, p.module) for p in self.parts)

    @property
    def widths(self) -> set[int]:
        """The pool row widths the site needs: its A rows' and each part's B rows'."""
        return {self.h_in, *(p.width for p in self.parts)}

    def factors(self, weights: dict) -> dict[Key, ModuleFactors]:
        """One adapter's factors for this site, sharded and scaled, in float32 (views where they can be):
        packing them for the pool (`PackedFactors.pack`) casts each once as it copies it.
        weights: module -> object with `a` [r, h_in], `b` [h_out, r] (full, unsharded) and `scale`;
        modules the adapter does not touch are absent."""
        out = {}
        for part in self.parts:
            w = weights.get(part.module)
            if w is None:
                continue
            a, b = w.a, w.b
            if part.in_shard is not None:
                a = a[:, part.in_shard[0] : part.in_shard[0] + part.in_shard[1]]
            if part.out_shard is not None:
                b = b[part.out_shard[0] : part.out_shard[0] + part.out_shard[1]]
            # The scale is folded into B in float32; the pack casts both once to the pool dtype.
            b_t = (b.float() * w.scale).T  # [r, width], a transposed view
            out[(self.layer, part.module)] = ModuleFactors(a, b_t)  # a: [r, h_in_local]
        return out
