"""Tensor-parallel linear layers, each owning how its shard is read from the checkpoint.

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and all-reduce the partial outputs. Fused layers (qkv, gate_up) are
column-parallel layers made of several checkpoint tensors ("sub-modules"), each split on its own, so a
rank's fused weight is [q_shard; k_shard; v_shard]. After loading, the weight moves into a LinearWeight
(linear_weight.py), which may keep it in a blocked layout: `weight` is the loading buffer only.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.linear_weight import LinearWeight
from worker.lora.batch import LoraBatch, SplitLoraBatch
from worker.lora.sites import LoraPart, LoraSite
from worker.parallel import ParallelContext, check_head_split
from worker.weights import CheckpointWeights


class ColumnParallelLinear(nn.Module):
    """y[:, local outputs] = x @ W_local.T (+ b_local) for the sub-modules of `shards`: name -> (start,
    length) of the rows this rank holds of that checkpoint tensor (`ctx.shard(size)` for an even split)."""

    def __init__(
        self,
        h_in: int,
        shards: dict[str, tuple[int, int]],
        bias: bool,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        lora_layer: int | None = None,
        lora_modules: tuple[str, ...] = (),
    ):
        super().__init__()
        self.h_in = h_in
        self.shards = shards
        h_out_local = sum(length for _, length in self.shards.values())
        self.weight = nn.Parameter(
            torch.empty(h_out_local, h_in, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(h_out_local, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        parts, column = [], 0
        for name, (start, length) in self.shards.items():
            if name in lora_modules:
                parts.append(LoraPart(name, None, (start, length), column, length))
            column += length
        # Where this layer applies LoRA (None: LoRA is off, or no module of it takes an adapter).
        self.lora_site = (
            LoraSite(lora_layer, tuple(parts), h_in) if lora_layer is not None and parts else None
        )

    def load(self, weights: CheckpointWeights, prefixes: dict[str, str]) -> None:
        """`prefixes`: sub-module name -> checkpoint prefix (e.g. 'model.layers.0.self_attn.q_proj')."""
        parts = [weights.get_shard(f"{prefixes[n]}.weight", 0, *self.shards[n]) for n in self.shards]
        self.weight.copy_(torch.cat(parts))
        if self.bias is not None:
            parts = [weights.get_shard(f"{prefixes[n]}.bias", 0, *self.shards[n]) for n in self.shards]
            self.bias.copy_(torch.cat(parts))
        self.matmul = LinearWeight(self.weight)
        del self.weight  # LinearWeight holds it now (packed where that is faster): no second copy

    def forward(self, x: torch.Tensor, lora: LoraBatch | SplitLoraBatch | None) -> torch.Tensor:
        out = self.matmul(x, self.bias)  # [num_tokens, h_out_local]
        if lora is not None and self.lora_site is not None:
            lora.apply(self.lora_site, x, out)
        return out


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection in whole heads per rank: query heads split evenly, key/value heads split
    evenly or, with more ranks than KV heads, are replicated (`worker.parallel.kv_head_shard`)."""

    def __init__(
        self, hidden_size, head_dim, num_heads, num_kv_heads, bias, ctx, dtype, device, lora_layer=None
    ):
        check_head_split(num_heads, num_kv_heads, ctx.world_size)
        first_kv, kv_count = ctx.kv_heads(num_kv_heads)
        kv_rows = (first_kv * head_dim, kv_count * head_dim)
        shards = {"q_proj": ctx.shard(num_heads * head_dim), "k_proj": kv_rows, "v_proj": kv_rows}
        super().__init__(hidden_size, shards, bias, ctx, dtype, device, lora_layer, tuple(shards))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Fused gate/up projection of the MLP."""

    def __init__(self, hidden_size, intermediate_size, ctx, dtype, device, lora_layer=None):
        shards = {"gate_proj": ctx.shard(intermediate_size), "up_proj": ctx.shard(intermediate_size)}
        super().__init__(hidden_size, shards, False, ctx, dtype, device, lora_layer, tuple(shards))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local.T) + b, with x and W split along the input features."""

    def __init__(
        self,
        name: str,
        h_in: int,
        h_out: int,
        bias: bool,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        lora_layer: int | None = None,
    ):
        super().__init__()
        self.ctx = ctx
        self.in_shard = ctx.shard(h_in)
        self.weight = nn.Parameter(
            torch.empty(h_out, self.in_shard[1], dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(h_out, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        part = LoraPart(name, self.in_shard, None, 0, h_out)
        self.lora_site = LoraSite(lora_layer, (part,), self.in_shard[1]) if lora_layer is not None else None

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        self.weight.copy_(weights.get_shard(f"{prefix}.weight", 1, *self.in_shard))
        if self.bias is not None:
            self.bias.copy_(weights.get(f"{prefix}.bias"))
        self.matmul = LinearWeight(self.weight)
        del self.weight  # LinearWeight holds it now (packed where that is faster): no second copy

    def forward(self, x: torch.Tensor, lora: LoraBatch | SplitLoraBatch | None) -> torch.Tensor:
        out = self.matmul(x)  # [num_tokens, h_out], this rank's partial sum
        if lora is not None and self.lora_site is not None:
            # The partial LoRA delta joins the partial base output; the all-reduce below sums both.
            lora.apply(self.lora_site, x, out)
        self.ctx.all_reduce(out)
        if self.bias is not None:
            out += self.bias  # once, after the reduce
        return out
