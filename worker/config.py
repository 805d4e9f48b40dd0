"""Configuration of one worker rank. Built by the launcher from its Settings; nothing here reads env.

A plain frozen dataclass (not pydantic) so the engine imports on machines with only torch installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

# Field annotation (a string under `from __future__ import annotations`) -> accepted JSON value types.
_JSON_TYPES = {
    "Path": (str,),
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "int | None": (int, type(None)),
    "float": (float, int),
    "bool": (bool,),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path
    dtype: str = "bfloat16"
    device: str = "cpu"
    block_size: int = 16
    # KV cache size: an explicit block count wins; otherwise as many blocks as fit kv_cache_bytes; with
    # neither (CUDA only), what a profiled step of profile_tokens leaves of memory_fraction of the device.
    num_blocks: int | None = None
    kv_cache_bytes: int | None = 1 << 30
    memory_fraction: float = 0.9
    profile_tokens: int = 4096  # the router's MAX_BATCH_PREFILL_TOKENS: the most prompt rows of a step
    max_lora_rank: int = 256  # the largest LoRA rank an adapter may have (a cap, not a reservation)
    max_adapters: int = 0  # resident adapter slots besides slot 0 ("no adapter"); 0 disables LoRA
    adapter_memory_bytes: int = 1 << 30  # the adapter pool the LoRA ops read (device memory)
    adapter_host_memory_bytes: int = 1 << 30  # prepared adapters kept on the host, so a reload is a copy
    adapter_load_nice: int | None = None  # the adapter reader's nice value; None: SCHED_IDLE
    native_cpu_kernels: bool = True  # the C++ LoRA kernel on the CPU (csrc/lora_cpu.cpp), where it builds
    kernel_cache_dir: str | None = None  # where it is built (None: ~/.cache/multilora/cpu_kernels)
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.block_size < 1 or self.max_lora_rank < 1 or self.max_adapters < 0:
            raise ValueError("block_size and max_lora_rank must be >= 1, max_adapters >= 0")
        if not 0 < self.memory_fraction <= 1 or self.profile_tokens < 1:
            raise ValueError("memory_fraction must be in (0, 1], profile_tokens >= 1")
        if self.adapter_memory_bytes < 0 or self.adapter_host_memory_bytes < 0:
            raise ValueError("adapter_memory_bytes and adapter_host_memory_bytes must be >= 0")
        if self.adapter_load_nice is not None and not 0 <= self.adapter_load_nice <= 19:
            raise ValueError(f"adapter_load_nice must be 0..19 or None, got {self.adapter_load_nice}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    def to_json(self) -> str:
        """The config as one JSON object (what the launcher passes to `python -m worker --config-json`)."""
        return json.dumps({**asdict(self), "model_dir": str(self.model_dir)})

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Parse `to_json` output; unknown fields, no `model_dir` or wrongly typed values raise ValueError."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"worker config is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("worker config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown worker config fields: {', '.join(unknown)}")
        if "model_dir" not in raw:
            raise ValueError("worker config needs model_dir")
        for name, value in raw.items():
            expected = _JSON_TYPES[known[name].type]
            # bool is an int subclass: accept it only where the field is a bool.
            if not isinstance(value, expected) or isinstance(value, bool) != (bool in expected):
                raise ValueError(f"worker config field {name!r} must be {known[name].type}, got {value!r}")
        return cls(**{**raw, "model_dir": Path(raw["model_dir"])})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", self.rank % max(torch.cuda.device_count(), 1))
        return torch.device(self.device)
