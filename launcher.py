"""multilora launcher: parse the settings, spawn the worker ranks, then the router; forward signals.

    python launcher.py --help            # every setting, its default and its environment variable

Settings come from CLI flags (`--model-id`) or environment variables with TGI's names (`MODEL_ID`), and
nowhere else. They are composed once into one `WorkerConfig` per rank and one `RouterConfig`, which the
children receive as JSON: a worker on its command line (`--config-json`), the router on its stdin
(`--config-json -`), because its config holds API_KEY and a command line is visible to every user in
`ps`. API_KEY is also left out of the children's environment.
Startup: resolve the model and the LORA_ADAPTERS entries to local directories, start NUM_SHARD workers
(`python -m worker`), wait until each listens on its socket, then start the router (`python -m router`),
which loads the adapters and serves HTTP.
One tensor-parallel group can span NUM_NODES nodes, one launcher each (launcher_nodes.py): node NODE_RANK
starts its share of the ranks; only node 0 starts the router, which reaches the other nodes' ranks over
TCP (WORKER_ADDRESSES) with WORKER_TOKEN.
Shutdown on SIGTERM/SIGINT: the router first (it stops accepting and finishes in-flight requests), then
the workers; exit 0. If any child dies, the others are stopped and the launcher exits 1.

This file composes the configs and runs `main`; the nouns live next to it: launcher_settings.py (the
settings), launcher_adapters.py (LORA_ADAPTERS), launcher_supervision.py (the children), launcher_nodes.py
(several nodes). Their public names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

import launcher_nodes
from launcher_adapters import (  # noqa: F401 - re-exported: launcher.<name> is the public surface
    AdapterSpec,
    ResolvedAdapter,
    adapter_rank,
    parse_lora_adapters,
    resolve_adapters,
)
from launcher_settings import (  # noqa: F401 - re-exported
    Settings,
    SettingsError,
    env_name,
    flag_name,
    format_validation_error,
    load_settings,
    settings_table,
)
from launcher_supervision import (  # noqa: F401 - re-exported
    FORCE_AFTER_S,
    KILL_GRACE_S,
    supervise,
    worker_listening,
)
from router.config import AdapterSource, RouterConfig
from worker.model_source import ModelSourceError

if TYPE_CHECKING:
    from worker.config import WorkerConfig  # imports torch: only where configs are built

logger = logging.getLogger("launcher")

# LoRA rank the workers reserve when no adapter is configured (LoRA is then off: zero slots).
FALLBACK_LORA_RANK = 8
UDS_MAX_BYTES = 107  # sun_path is 108 bytes with the trailing NUL


# ---- composition ---------------------------------------------------------------------------------


def compose(
    settings: Settings,
    model_dir: Path,
    adapters: list[ResolvedAdapter],
    uds_paths: list[str],
    device: str,
) -> tuple[list[WorkerConfig], RouterConfig]:
    """One WorkerConfig per rank and the RouterConfig; shared values are written into both here."""
    from worker.config import WorkerConfig

    largest = max((a.rank for a in adapters), default=None)
    max_rank = settings.max_lora_rank or largest or FALLBACK_LORA_RANK
    if largest is not None and max_rank < largest:
        worst = max(adapters, key=lambda a: a.rank)
        raise SettingsError(
            f"MAX_LORA_RANK ({max_rank}) is below the rank {worst.rank} of adapter {worst.spec.id!r}"
        )
    slots = len(adapters) if settings.max_lora_adapters is None else settings.max_lora_adapters
    if slots < len(adapters):
        raise SettingsError(
            f"MAX_LORA_ADAPTERS ({slots}) is below the number of LORA_ADAPTERS ({len(adapters)}); "
            "every adapter is loaded at startup"
        )
    common: dict[str, Any] = dict(
        model_dir=model_dir,
        dtype=settings.resolved_dtype(device),
        device=device,
        block_size=settings.block_size,
        kv_cache_bytes=settings.resolved_kv_cache_bytes(device),
        max_lora_rank=max_rank,
        max_adapters=slots,
        world_size=settings.num_shard,
        master_addr=settings.master_addr,
        master_port=settings.master_port,
    )
    try:
        ranks = launcher_nodes.NodeLayout.of(settings).ranks
        workers = [WorkerConfig(rank=rank, **common) for rank in ranks]
        router = RouterConfig(
            model_id=settings.model_id,
            model_dir=str(model_dir),
            hostname=settings.hostname,
            port=settings.port,
            worker_uds=uds_paths,
            worker_tcp=launcher_nodes.remote_rank_addresses(settings),
            worker_token=settings.worker_token or None,
            adapters=[
                AdapterSource(id=a.spec.id, source=_source(a.spec), path=str(a.path)) for a in adapters
            ],
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
            max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
            max_batch_total_tokens=settings.max_batch_total_tokens,
            max_batch_size=settings.max_batch_size,
            api_key=settings.api_key or None,
            payload_limit=settings.payload_limit,
            grpc_port=settings.grpc_port,
            max_concurrent_requests=settings.max_concurrent_requests,
            max_stop_sequences=settings.max_stop_sequences,
            max_top_n_tokens=settings.max_top_n_tokens,
            max_best_of=settings.max_best_of,
            waiting_served_ratio=settings.waiting_served_ratio,
            max_waiting_tokens=settings.max_waiting_tokens,
            shutdown_timeout_s=settings.graceful_termination_timeout,
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


# ---- main ----------------------------------------------------------------------------------------


def prepare(settings: Settings) -> tuple[list[WorkerConfig], RouterConfig, Path]:
    """Resolve the model and adapters and compose the configs; returns them and the socket dir."""
    from worker.model_source import resolve_model_dir

    specs = parse_lora_adapters(settings.lora_adapters)
    device = settings.resolved_device()
    local_size = launcher_nodes.NodeLayout.of(settings).local_size
    if device == "cuda":
        import torch

        if local_size > torch.cuda.device_count():
            per_node = "" if settings.num_nodes == 1 else f"/NUM_NODES ({settings.num_nodes})"
            raise SettingsError(
                f"NUM_SHARD ({settings.num_shard}){per_node} exceeds the {torch.cuda.device_count()} "
                "visible GPUs"
            )
    hf_cache = settings.huggingface_hub_cache.expanduser() if settings.huggingface_hub_cache else None
    try:
        model_dir = resolve_model_dir(
            settings.model_id,
            settings.revision,
            settings.multilora_cache.expanduser(),
            hf_cache_dir=hf_cache,
        )
    except ModelSourceError as exc:
        raise SettingsError(f"MODEL_ID ({settings.model_id!r}): {exc}") from None
    adapters = resolve_adapters(specs, hf_cache)
    for adapter in adapters:
        logger.info("adapter %r: %s (rank %d)", adapter.spec.id, adapter.path, adapter.rank)
    uds_dir, uds_paths = make_uds_paths(settings.shard_uds_path, local_size)
    try:
        workers, router = compose(settings, model_dir, adapters, uds_paths, device)
    except SettingsError:
        shutil.rmtree(uds_dir, ignore_errors=True)
        raise
    return workers, router, uds_dir


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        settings = load_settings(argv)
        workers, router, uds_dir = prepare(settings)
    except SettingsError as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "model %s: %d rank(s) on %s in %s, %d adapter slot(s), max LoRA rank %d",
        router.model_dir,
        len(workers),
        workers[0].device,
        workers[0].dtype,
        workers[0].max_adapters,
        workers[0].max_lora_rank,
    )
    py = sys.executable
    if settings.node_rank > 0:  # its ranks serve node 0's router over TCP; no router here
        listen = launcher_nodes.listen_addresses(settings)
        try:
            return supervise(
                [
                    [py, "-m", "worker", "--config-json", w.to_json(), "--listen", a, "--token-stdin"]
                    for w, a in zip(workers, listen, strict=True)
                ],
                None,
                lambda index: launcher_nodes.rank_listening(listen[index]),
                settings.graceful_termination_timeout,
                worker_ranks=[w.rank for w in workers],
                worker_stdin=f"{settings.worker_token}\n".encode(),
            )
        finally:
            shutil.rmtree(uds_dir, ignore_errors=True)
    try:
        return supervise(
            [
                [py, "-m", "worker", "--config-json", w.to_json(), "--uds", u]
                for w, u in zip(workers, router.worker_uds, strict=True)
            ],
            [py, "-m", "router", "--config-json", "-"],
            lambda rank: worker_listening(router.worker_uds[rank]),
            settings.graceful_termination_timeout,
            router_stdin=router.model_dump_json().encode(),
        )
    finally:
        shutil.rmtree(uds_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
