"""Read checkpoint tensors from safetensors files, whole or as one rank's slice.

Slices are read with `get_slice`, so a rank reads only its own part of each sharded tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    pass


class CheckpointWeights:
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}  # noqa: SIM118

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name).to(self.device, self.dtype)

    def get_shard(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows [start, start + length) of tensor `name` along `dim` (0 or 1)."""
        sl = self._handle(name).get_slice(name)
        index = (slice(start, start + length),) if dim == 0 else (slice(None), slice(start, start + length))
        return sl[index].to(self.device, self.dtype)
