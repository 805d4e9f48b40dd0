"""The machine's ceilings (memory copy bandwidth, GEMM FLOP/s in the served dtype), the model sizes for P3,
P4, P6, and how fast the model's own linear layers run here (the floor under any step: ratios.py's machine
bounds)."""

from __future__ import annotations

import json
import os
import platform
import time
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


def lora_slot_bytes(model_dir: Path, max_rank: int, device: str = "cpu", dtype=torch.bfloat16) -> int:
    """Bytes one adapter slot takes in the worker's LoRA stacks at `max_rank`, read from the engine's
    own layout (the model is built on the meta device, so nothing is allocated)."""
    from transformers import AutoConfig

    from worker.kernels import select_lora_ops
    from worker.lora.stacks import LoraLayout
    from worker.models.llama import LlamaForCausalLM
    from worker.parallel import ParallelContext

    config = AutoConfig.from_pretrained(model_dir)
    ops = select_lora_ops(torch.device(device))
    meta = torch.device("meta")

    def stacks(num_slots: int) -> int:
        layout = LoraLayout(num_slots, max_rank, ops.stack_dtype(dtype), meta, ops.fuse_sub_modules)
        model = LlamaForCausalLM(config, ParallelContext(), dtype, meta, layout)
        total = 0
        for module in model.modules():
            found = getattr(module, "lora_stacks", None)
            for s in found if isinstance(found, list) else []:
                total += s.lora_a_stack.nbytes + s.lora_b_stack.nbytes
        return total

    return stacks(3) - stacks(2)


def serving_device() -> str:
    """Where the launcher serves by default (DEVICE=auto)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory() -> int:
    """Free bytes where the LoRA stacks live: the GPU's on CUDA, else the host's MemAvailable."""
    if serving_device() == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith("MemAvailable"))) * 1024
