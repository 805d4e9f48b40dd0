"""The machine's ceilings (memory copy bandwidth, GEMM FLOP/s in the served dtype), the model sizes for P3,
P4, P6, how fast the model's own linear layers run here (the floor under any step: ratios.py's machine
bounds), and what adapters take in the workers' adapter pool (ADAPTER_MEMORY)."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open


def _best_time(fn, repeats: int) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: time them to completion
        return time.perf_counter() - start

    timed()  # warm-up: first-touch page faults, oneDNN or cuBLAS kernel selection
    return min(timed() for _ in range(repeats))


def copy_bandwidth(size_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of `dst.copy_(src)` over a tensor far larger than the caches, read + write bytes counted,
    on the serving device (the GPU's memory on CUDA)."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=serving_device())
    dst = torch.empty_like(src)
    return 2 * size_bytes / _best_time(lambda: dst.copy_(src), repeats)


def gemm_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of one n x n @ n x n matmul (2 n^3 FLOPs) in `dtype` on the serving device (CPU: torch's
    default threads)."""
    a = torch.randn(n, n, device=serving_device()).to(dtype)
    b = torch.randn(n, n, device=serving_device()).to(dtype)
    return 2 * n**3 / _best_time(lambda: torch.matmul(a, b), repeats)


def linear_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """[out, in] of every linear layer one forward runs, in order: per decoder layer the fused q/k/v, o,
    the fused gate/up and down, then the LM head (as the worker fuses them on one rank)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    layer = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def linear_pass_s(model_dir: Path, rows: int, repeats: int = 5, dtype=torch.bfloat16) -> float:
    """Seconds for one pass through every linear layer of the model (linear_shapes) at `rows` input rows,
    best of `repeats`, with the worker's own LinearWeight (packed as served) over random weights of
    those shapes. The weights are larger than the caches, so at few rows they stream from memory as in
    a decode step: no step of the server can take less than this."""
    from worker.layers.linear_weight import LinearWeight

    device = serving_device()
    layers = [LinearWeight(torch.randn(o, i, device=device).to(dtype)) for o, i in linear_shapes(model_dir)]
    inputs = {i: torch.randn(rows, i, device=device).to(dtype) for i in {w.in_features for w in layers}}

    def run():
        for w in layers:
            w(inputs[w.in_features])

    return _best_time(run, repeats)


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    return {
        "cpu": names[0] if names else cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0],  # at the start: other work here makes every figure noisy
    }


def model_size(model_dir: Path) -> dict:
    """Parameters and bytes of the checkpoint (tied embeddings counted once: they are read once per
    decode step, as the LM head) — the weight bytes a decode step must read."""
    params = nbytes = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                params += numel
                nbytes += numel * _dtype_size(t.get_dtype())
    config = json.loads((model_dir / "config.json").read_text())
    return {"parameters": params, "weight_bytes": nbytes, "num_layers": config["num_hidden_layers"]}


def _dtype_size(name: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1}[name]


def lora_widths(model_dir: Path) -> tuple[int, ...]:
    """The row widths of one rank's adapter pool at NUM_SHARD=1: every width the model's LoRA sites
    read, from the engine's own sites (the model is built on the meta device, so nothing is allocated)."""
    from transformers import AutoConfig

    from worker.models.llama import LlamaForCausalLM
    from worker.parallel import ParallelContext

    config = AutoConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM(config, ParallelContext(), torch.float32, torch.device("meta"), True)
    return tuple(sorted({w for layer in model.layers for site in layer.lora_sites() for w in site.widths}))


def pool_dtype(device: str, model_dtype: torch.dtype) -> torch.dtype:
    """The adapter pool's dtype for a model served in `model_dtype` on `device`, by the LoRA ops' own
    rule (called on the class: building the CUDA ops here would compile their kernels in this process).
    On the CPU, the native kernel's where it builds (as a server with NATIVE_CPU_KERNELS on finds)."""
    if device == "cuda":
        from worker.kernels.cuda import CudaLoraOps as Ops
    else:
        from worker.kernels.cpu_native import NativeCpuLoraOps, load_native
        from worker.kernels.torch_ops import TorchLoraOps

        Ops = NativeCpuLoraOps if load_native() is not None else TorchLoraOps
    return Ops.pool_dtype(None, model_dtype)  # type: ignore[arg-type]  # self is unused


def lora_rows(adapter_dir: Path) -> Counter[int]:
    """width -> the rank rows a PEFT adapter takes in the pool of one rank at NUM_SHARD=1 (from its
    safetensors header): r rows of h_in for each lora_A [r, h_in], r rows of h_out for each lora_B
    [h_out, r]."""
    rows: Counter[int] = Counter()
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            shape = f.get_slice(key).get_shape()
            if ".lora_A." in key:
                rows[shape[1]] += shape[0]
            elif ".lora_B." in key:
                rows[shape[0]] += shape[1]
    return rows


def true_lora_bytes(adapter_dir: Path, element_size: int) -> int:
    """An adapter's true size: its LoRA A and B elements x `element_size` (the pool's)."""
    return element_size * sum(w * n for w, n in lora_rows(adapter_dir).items())


def adapter_memory_for(
    model_dir: Path, rows: Mapping[int, int], dtype: torch.dtype, slack: float = 1.0
) -> int:
    """ADAPTER_MEMORY (one rank, NUM_SHARD=1) that holds adapters of `rows` (width -> rows, summed over
    them: lora_rows) at once, with `slack` x their rows: the pages the pool's own allocator takes for
    them, plus one page per width class (a class's last page may be partly used), in whole pages."""
    from worker.lora.pages import RowAllocator, page_elems_for

    widths = lora_widths(model_dir)
    page_elems = page_elems_for(widths)
    demand = {w: math.ceil(n * slack) for w, n in rows.items() if n}
    pages = RowAllocator(0, page_elems, widths).pages_needed(demand) + len(widths)
    return pages * page_elems * torch.empty((), dtype=dtype).element_size()


def serving_device() -> str:
    """Where the launcher serves by default (DEVICE=auto)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory() -> int:
    """Free bytes where the adapter pool lives: the GPU's on CUDA, else the host's MemAvailable."""
    if serving_device() == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith("MemAvailable"))) * 1024
