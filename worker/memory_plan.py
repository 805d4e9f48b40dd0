"""How much device memory the KV cache may take, from a reading taken after a profiling step.

Without an explicit KV cache size, a rank on a GPU builds its model and adapter pool, runs the largest
step the router will send it (`ModelRunner._profile_step`), and gives the KV cache what is left of
`fraction` of the device:

    budget = fraction * total - peak - others

`peak` is the most memory this process's tensors held during the profile (weights, adapter pool,
activations and logits of the step), and `others` what the device holds outside this process's torch
allocator (the CUDA context, NCCL and cuBLAS buffers, other processes): `total - free - reserved`. vLLM
plans the same way; the fraction leaves room for what no profile sees (allocator fragmentation, the
workspaces of shapes not yet run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryReading:
    total: int  # bytes of device memory
    free: int  # bytes free on the device now, for any process
    reserved: int  # bytes this process's torch allocator holds now (in use or cached)
    peak: int  # the most bytes this process's tensors held since the meter's last reset


class CudaMemoryMeter:
    """Reads one CUDA device's memory (`MemoryReading`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def release_cached(self) -> None:
        """Give the allocator's cached, unused blocks back, so the KV cache can be one allocation."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def read(self) -> MemoryReading:
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryReading(
            total=total,
            free=free,
            reserved=torch.cuda.memory_reserved(self.device),
            peak=torch.cuda.max_memory_allocated(self.device),
        )


def memory_meter_for(device: torch.device) -> CudaMemoryMeter:
    if device.type != "cuda":
        raise ValueError(
            f"the KV cache is planned from device memory only on CUDA; on {device.type} give its size "
            "(kv_cache_bytes or num_blocks)"
        )
    return CudaMemoryMeter(device)


def kv_cache_budget(reading: MemoryReading, fraction: float, profile_cache_bytes: int) -> int:
    """Bytes the KV cache may take (module docstring); `profile_cache_bytes` is the small KV cache the
    profile ran on, counted in `peak` but replaced by the real one. Raises ValueError if nothing is left."""
    others = reading.total - reading.free - reading.reserved
    allowed = int(reading.total * fraction)
    budget = allowed - (reading.peak - profile_cache_bytes) - others
    if budget <= 0:
        raise ValueError(
            f"no device memory is left for the KV cache: {fraction:g} of {reading.total / GIB:.2f} GiB is "
            f"{allowed / GIB:.2f} GiB, the profiled step peaked at {reading.peak / GIB:.2f} GiB and others "
            f"hold {others / GIB:.2f} GiB; raise CUDA_MEMORY_FRACTION, lower MAX_BATCH_PREFILL_TOKENS or "
            "ADAPTER_MEMORY, or set KV_CACHE_MEMORY"
        )
    return budget
