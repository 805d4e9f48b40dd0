"""The arguments of the LoRA ops over the adapter pool (`worker/lora/pool.py`), as one step passes them.

A LoRA *site* is one base linear layer's LoRA: one input x and one or more modules (parts) that read
it, each adding into its own columns of the layer's output (q/k/v of the fused qkv layer, gate/up, or a
single o, down). Every part's A rows have the site's input width, so they share one pool view.

`g` indexes the step's G active adapters (`StepTables`), -1 is "no adapter". The spec of an op call is
`reference.lora_site_ref`: `lora_pool_ref` for each part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Key = tuple[int, str]  # (layer, module), e.g. (3, "q_proj")


@dataclass(frozen=True)
class StepRows:
    """Which adapter each row of one LoRA call uses: per row (bgmv) and as segments of rows (sgmv).

    Both describe the same rows; an implementation reads whichever suits it. `use_segments` is the
    runner's hint (a prompt's rows, or decode rows grouped by `row_order`): segments are long or few.
    """

    row_adapter: torch.Tensor  # [T] int32 on the device, g in [-1, G)
    segment_indptr: torch.Tensor  # [S + 1] int32 on the device, from 0, non-decreasing, ends at T
    segment_adapters: torch.Tensor  # [S] int32 on the device, g in [-1, G)
    host_indptr: tuple[int, ...]  # the same, on the host (no device sync to plan a call)
    host_segment_adapters: tuple[int, ...]
    adapters: tuple[int, ...]  # [G] handles of the adapters' pool rows (unique while placed): a cache key
    use_segments: bool

    @classmethod
    def build(
        cls, row_adapters: list[int], adapters: tuple[int, ...], use_segments: bool, device: torch.device
    ) -> StepRows:
        """`row_adapters`: g of each row, in row order; `adapters`: the step's G adapter handles."""
        indptr, seg = [0], []
        for i, g in enumerate(row_adapters):
            if seg and seg[-1] == g:
                indptr[-1] = i + 1
            else:
                seg.append(g)
                indptr.append(i + 1)

        def as_tensor(v):
            return torch.tensor(v, dtype=torch.int32, device=device)

        return cls(
            row_adapter=as_tensor(row_adapters),
            segment_indptr=as_tensor(indptr),
            segment_adapters=as_tensor(seg),
            host_indptr=tuple(indptr),
            host_segment_adapters=tuple(seg),
            adapters=adapters,
            use_segments=use_segments,
        )

    @property
    def num_rows(self) -> int:
        return self.host_indptr[-1]


@dataclass(frozen=True)
class PoolPart:
    """One module of a site, as one step sees it: where its adapters' rows are and where it writes."""

    key: Key
    b_view: torch.Tensor  # [num_rows(h_out), h_out]: the pool as rows of this part's output width
    a_rows: torch.Tensor  # [G, R_max] int32 on the device: rows of the site's a_view (PAD_ROW past r)
    b_rows: torch.Tensor  # [G, R_max] int32 on the device: rows of b_view
    lora_ranks: torch.Tensor  # [G] int32 on the device; 0 = adapter g does not target this module
    host_lora_ranks: tuple[int, ...]  # [G], the same on the host
    out_offset: int  # first column of this part in the layer's (local) output

    @property
    def h_out(self) -> int:
        return self.b_view.shape[1]
