"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.layers.linear_weight import LinearWeight
from worker.parallel import ParallelContext
from worker.weights import CheckpointWeights


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype, device):
        super().__init__()
        self.ctx = ctx
        self.start, self.length = ctx.shard(vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.length, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def load(self, weights: CheckpointWeights, name: str) -> None:
        self.weight.copy_(weights.get_shard(name, 0, self.start, self.length))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.length)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [num_tokens, hidden]
        out.masked_fill_(outside.unsqueeze(-1), 0)
        # Each id lives on exactly one rank; summing puts every row together on all ranks.
        return self.ctx.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = x @ W.T over the full vocabulary; each rank computes its slice, then all gather."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype, device):
        super().__init__(vocab_size, hidden_size, ctx, dtype, device)
        self.vocab_size = vocab_size

    def load(self, weights: CheckpointWeights, name: str) -> None:
        super().load(weights, name)
        self.matmul = LinearWeight(self.weight)
        del self.weight  # LinearWeight holds it now (packed where that is faster): no second copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(x).float()  # [num_rows, vocab_local]
        # Every rank gets the full logits, so all ranks sample the same token in lockstep.
        return self.ctx.all_gather_last_dim(logits, self.vocab_size)
