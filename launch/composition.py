"""The settings composed into the children's configs: one WorkerConfig per local rank and the RouterConfig.

`prepare` resolves the model and LORA_ADAPTERS to local directories, makes the worker sockets' private
directory and composes; `compose` writes the values both sides share into both, and checks them once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from launch import nodes
from launch.adapters import AdapterSpec, ResolvedAdapter, parse_lora_adapters, resolve_adapters
from launch.dtype import auto_dtype
from launch.model_source import ModelSourceError, resolve_model_dir
from launch.settings import AUTO_MAX_LORA_RANK, RUNTIME_ADAPTER_SLOTS, Settings, SettingsError
from router.config import AdapterSource, RouterConfig

if TYPE_CHECKING:
    from worker.config import WorkerConfig  # imports torch: only where configs are built

logger = logging.getLogger("launcher")

UDS_MAX_BYTES = 107  # sun_path is 108 bytes with the trailing NUL


def compose(
    settings: Settings,
    model_dir: Path,
    adapters: list[ResolvedAdapter],
    uds_paths: list[str],
    device: str,
) -> tuple[list[WorkerConfig], RouterConfig]:
    """One WorkerConfig per rank and the RouterConfig; shared values are written into both here."""
    from worker.config import WorkerConfig
    from worker.kernels.cpu_native import default_cache_root

    largest = max((a.lora_rank for a in adapters), default=0)
    max_lora_rank = settings.max_lora_rank or max(largest, AUTO_MAX_LORA_RANK)
    if max_lora_rank < largest:
        worst = max(adapters, key=lambda a: a.lora_rank)
        raise SettingsError(
            f"MAX_LORA_RANK ({max_lora_rank}) is below the LoRA rank {worst.lora_rank} of adapter "
            f"{worst.spec.id!r}"
        )
    slots = settings.max_lora_adapters
    if slots is None:
        slots = len(adapters) + RUNTIME_ADAPTER_SLOTS
    if slots < len(adapters):
        raise SettingsError(
            f"MAX_LORA_ADAPTERS ({slots}) is below the number of LORA_ADAPTERS ({len(adapters)}); "
            "each of them is loaded at startup and pinned to a slot"
        )
    hf_cache = settings.hf_cache_dir()
    adapter_memory, adapter_host_memory = settings.resolved_adapter_memory(device)
    common: dict[str, Any] = dict(
        model_dir=model_dir,
        dtype=settings.resolved_dtype(device),
        device=device,
        block_size=settings.block_size,
        kv_cache_bytes=settings.resolved_kv_cache_bytes(device),
        memory_fraction=settings.cuda_memory_fraction,
        profile_tokens=settings.max_batch_prefill_tokens,
        max_lora_rank=max_lora_rank,
        max_adapters=slots,
        adapter_memory_bytes=adapter_memory,
        adapter_host_memory_bytes=adapter_host_memory,
        adapter_load_nice=settings.adapter_load_nice(),
        native_cpu_kernels=settings.native_cpu_kernels,
        kernel_cache_dir=str(default_cache_root(settings.multilora_cache)),
        world_size=settings.num_shard,
        master_addr=settings.master_addr,
        master_port=settings.master_port,
    )
    layout = settings.node_layout
    try:
        workers = [WorkerConfig(rank=rank, **common) for rank in layout.ranks]
        router = RouterConfig(
            model_id=settings.model_id,
            model_dir=str(model_dir),
            hostname=settings.hostname,
            port=settings.port,
            worker_uds=uds_paths,
            worker_tcp=nodes.remote_rank_addresses(
                layout, settings.worker_addresses, settings.worker_port_base
            ),
            worker_token=settings.worker_token or None,
            adapters=[
                AdapterSource(id=a.spec.id, source=_source(a.spec), path=str(a.path)) for a in adapters
            ],
            adapter_roots=settings.adapter_roots,
            adapter_download=settings.adapter_download,
            hf_cache_dir=None if hf_cache is None else str(hf_cache),
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
            max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
            max_batch_total_tokens=settings.max_batch_total_tokens,
            max_batch_size=settings.max_batch_size,
            api_key=settings.api_key or None,
            api_keys=settings.tenant_keys(),
            tenant_weights=settings.weights("tenant_weights"),
            adapter_weights=settings.weights("adapter_weights"),
            adapter_queue_share=settings.adapter_queue_share,
            payload_limit=settings.payload_limit,
            grpc_port=settings.grpc_port,
            max_concurrent_requests=settings.max_concurrent_requests,
            max_stop_sequences=settings.max_stop_sequences,
            max_top_n_tokens=settings.max_top_n_tokens,
            max_best_of=settings.max_best_of,
            waiting_served_ratio=settings.waiting_served_ratio,
            max_waiting_tokens=settings.max_waiting_tokens,
            shutdown_timeout_s=settings.graceful_termination_timeout,
            step_timeout_floor_s=settings.step_timeout_floor,
            step_timeout_factor=settings.step_timeout_factor,
            launcher_pid=os.getpid(),
        )
    except (ValueError, ValidationError) as exc:
        raise SettingsError(f"invalid configuration: {exc}") from None
    return workers, router


def _source(spec: AdapterSpec) -> str:
    return spec.source if spec.revision is None else f"{spec.source}@{spec.revision}"


def make_uds_paths(shard_uds_path: Path | None, num_shard: int) -> tuple[Path, list[str]]:
    """A private (0700) directory and one socket path per rank inside it."""
    if shard_uds_path is None:
        directory = Path(tempfile.mkdtemp(prefix="multilora-"))
        names = [f"worker-{rank}.sock" for rank in range(num_shard)]
    else:
        base = shard_uds_path.expanduser().absolute()
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=f"{base.name}-", dir=base.parent))
        except OSError as exc:
            raise SettingsError(f"SHARD_UDS_PATH ({shard_uds_path}): {exc}") from None
        names = [f"{base.name}-{rank}" for rank in range(num_shard)]
    paths = [str(directory / name) for name in names]
    if max(len(os.fsencode(p)) for p in paths) > UDS_MAX_BYTES:
        shutil.rmtree(directory, ignore_errors=True)
        raise SettingsError(
            f"SHARD_UDS_PATH: socket path {paths[-1]!r} is over {UDS_MAX_BYTES} bytes; use a shorter one"
        )
    return directory, paths


def check_head_layout(model_dir: Path, num_shard: int) -> None:
    """Refuse a NUM_SHARD the model's attention heads cannot be laid out over, before any rank starts."""
    from worker.parallel import check_head_split

    config = json.loads((model_dir / "config.json").read_text())
    num_heads = config.get("num_attention_heads")
    if num_heads is None:
        return  # not an attention config the worker knows: it refuses the architecture itself
    try:
        check_head_split(num_heads, config.get("num_key_value_heads") or num_heads, num_shard)
    except ValueError as exc:
        raise SettingsError(f"NUM_SHARD ({num_shard}): {exc}") from None


def prepare(settings: Settings) -> tuple[list[WorkerConfig], RouterConfig, Path]:
    """Resolve the model and adapters and compose the configs; returns them and the socket dir."""
    specs = parse_lora_adapters(settings.lora_adapters)
    device = settings.resolved_device()
    local_size = settings.node_layout.local_size
    if device == "cuda":
        import torch

        if local_size > torch.cuda.device_count():
            per_node = "" if settings.num_nodes == 1 else f"/NUM_NODES ({settings.num_nodes})"
            raise SettingsError(
                f"NUM_SHARD ({settings.num_shard}){per_node} exceeds the {torch.cuda.device_count()} "
                "visible GPUs"
            )
    if settings.dtype is None:
        choice = auto_dtype(device)
        logger.info("DTYPE auto: %s (%s)", choice.dtype, choice.reason)
    hf_cache = settings.hf_cache_dir()
    try:
        model_dir = resolve_model_dir(
            settings.model_id,
            settings.revision,
            settings.multilora_cache.expanduser(),
            hf_cache_dir=hf_cache,
        )
    except ModelSourceError as exc:
        raise SettingsError(f"MODEL_ID ({settings.model_id!r}): {exc}") from None
    check_head_layout(model_dir, settings.num_shard)
    adapters = resolve_adapters(specs, hf_cache)
    for adapter in adapters:
        logger.info("adapter %r: %s (LoRA rank %d)", adapter.spec.id, adapter.path, adapter.lora_rank)
    uds_dir, uds_paths = make_uds_paths(settings.shard_uds_path, local_size)
    try:
        workers, router = compose(settings, model_dir, adapters, uds_paths, device)
    except SettingsError:
        shutil.rmtree(uds_dir, ignore_errors=True)
        raise
    return workers, router, uds_dir
