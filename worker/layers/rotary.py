"""Rotary position embeddings (rotate-half convention, as HF Llama), for any rope type HF knows.

With the native fused ops (`worker/kernels/cpu_fused.py`, chosen once by `select_fused_ops`) the step's
cos / sin tables and each layer's rotation are one native call each; torch's ops otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """Rope settings of a transformers 5 config (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, device: torch.device, fused=None):
        """fused: the native fused ops (`select_fused_ops`), None for torch's."""
        super().__init__()
        self.fused = fused
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponents)
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"rope type {rope_type!r} is not supported")
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [head_dim / 2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim] in `dtype`."""
        if self.fused is not None:
            return self.fused.rotary_cos_sin(positions, self.inv_freq, self.attention_scaling, dtype)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
