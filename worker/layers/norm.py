"""RMSNorm as in Llama: normalise in float32, scale in the model dtype; fused with the residual add.

The residual stream (HF's hidden states) is carried as (x, residual), their sum: each norm adds a
layer's output into the stream and normalises it (`add`), one native call where the fused ops serve
(`worker/kernels/cpu_fused.py`, chosen once by `select_fused_ops`), torch's ops otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.weights import CheckpointWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x * rsqrt(mean(x^2) + eps) in float32 as one op (five as separate ones), then HF's rounding:
    # cast to the model dtype before the weight multiplies.
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual  # rounded to the model dtype, as HF's residual add
    return rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype, device, fused=None):
        """fused: the native fused ops (`select_fused_ops`), None for torch's."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self._norm = rms_norm if fused is None else fused.rms_norm
        self._add_norm = add_rms_norm if fused is None else fused.add_rms_norm

    def load(self, weights: CheckpointWeights, name: str) -> None:
        self.weight.copy_(weights.get(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a layer's output x joins the stream, which is normalised.
        residual None: x is the whole stream (the first layer's embeddings). The fused op works in place
        (x and residual are written), so the caller passes tensors it owns."""
        if residual is None:
            return self(x), x
        return self._add_norm(x, residual, self.weight, self.eps)
