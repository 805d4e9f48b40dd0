"""RMSNorm as in Llama: normalise in float32, scale in the model dtype."""

from __future__ import annotations

import torch
from torch import nn

from worker.weights import CheckpointWeights


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def load(self, weights: CheckpointWeights, name: str) -> None:
        self.weight.copy_(weights.get(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
