"""RMSNorm as in Llama: normalise in float32, scale in the model dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        # x * rsqrt(mean(x^2) + eps) in float32 as one op (five as separate ones), then HF's rounding:
        # cast to the model dtype before the weight multiplies.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)
