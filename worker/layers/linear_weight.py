"""A linear layer's loaded weight, kept in the form its device multiplies fastest.

On the CPU, `F.linear` in bfloat16 hands oneDNN a plain [out, in] weight, which oneDNN reorders into its
blocked layout on every call: the reorder reads and writes the whole weight again, and a decode step is
memory-bound on exactly those bytes. Reordering once after loading (the same prepacking torch.compile's
freezing pass does) and calling the packed matmul skips that, most at the few rows of a decode step; the
output is bitwise that of `F.linear` (same kernel, same blocking of the sum;
tests/worker/test_linear_weight.py checks it). float32 keeps `F.linear` (its MKL GEMM does not reorder
per call, so packing gains nothing), as do float16 and every non-CPU device.

The plain weight is dropped after packing, so a packed model takes no more memory than a plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _packs(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class LinearWeight:
    """y = x @ W.T (+ bias) for one loaded weight W [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = _packs(weight)
        if self.packed:
            # The batch-size hint only tunes the blocking; any number of rows works with any hint.
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)
        else:
            self.weight = weight.detach()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        if self.packed:
            # The overload itself, not the packet: the packet resolves the overload on every call, a
            # large share of a one-row matmul.
            return torch.ops.mkldnn._linear_pointwise.default(x, self.weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)
