"""Router configuration: what the launcher hands to ``python -m router --config-json``."""

from __future__ import annotations

import signal

from pydantic import BaseModel, ConfigDict


class AdapterSource(BaseModel):
    """One LoRA adapter to load at startup."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """The name requests use as ``adapter_id``."""
    source: str
    """What the user wrote (hub id or path), shown in /info."""
    path: str
    """Resolved local directory with adapter_config.json and adapter_model.safetensors."""


class RouterConfig(BaseModel):
    """Everything the router needs; limits left at None are derived from the workers' Info."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    model_dir: str
    hostname: str = "0.0.0.0"
    port: int = 3000
    worker_uds: list[str]
    """Unix sockets of the ranks on this node (ranks 0..len-1)."""
    worker_tcp: list[str] = []
    """`host:port` of the ranks on other nodes of a multi-node group, in rank order after `worker_uds`."""
    worker_token: str | None = None
    """The group's WORKER_TOKEN, sent to every rank (the TCP ranks refuse calls without it)."""
    adapters: list[AdapterSource] = []
    """LORA_ADAPTERS: loaded at startup into slots 1..N, in order, and pinned (never evicted)."""
    adapter_roots: list[str] = []
    """LORA_ADAPTER_ROOTS: directories whose `name` or `org/name` sub-directories requests may name as
    adapter ids (loaded on first request), and that `POST /v1/load_lora_adapter` paths must lie in."""
    adapter_download: bool = False
    """ADAPTER_DOWNLOAD: an adapter id found neither under a root nor in the HF cache is downloaded from
    the Hugging Face Hub. Off by default: any client could otherwise make the server download any repo."""
    hf_cache_dir: str | None = None
    """HUGGINGFACE_HUB_CACHE: the hub cache adapter ids are looked up in (None: huggingface_hub's default)."""
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    # TGI's default is 0.3; with join steps a newcomer costs the batch only its prompt rows, and waiting
    # for company measured 2x worse TTFT p50 and 5x worse p99 at no ITL gain (docs/benchmarks.md).
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    shutdown_timeout_s: float = 30.0
    api_key: str | None = None
    """TGI's API_KEY: when set, the generation routes (every POST route) and the public gRPC service need
    `Authorization: Bearer <api_key>`; info routes (/health, /info, /metrics, /docs, ...) stay open."""
    api_keys: dict[str, str] = {}
    """API_KEYS: tenant name -> key. Each key opens what `api_key` opens, and the request is its tenant's;
    with two or more keys (`api_key` counts as tenant `default`) the queue is fair per tenant."""
    tenant_weights: dict[str, float] = {}
    """TENANT_WEIGHTS: a tenant's share of the server relative to the others' (absent: 1)."""
    adapter_weights: dict[str, float] = {}
    """ADAPTER_WEIGHTS: an adapter's share (the base model's: `model_id`) relative to the others'
    (absent: 1)."""
    adapter_queue_share: float = 1.0
    """ADAPTER_QUEUE_SHARE: the fraction of `max_concurrent_requests` one adapter's sequences may hold
    waiting; more are answered 429 naming the adapter."""
    payload_limit: int = 2_000_000
    """TGI's PAYLOAD_LIMIT: the largest request body in bytes (413 above it; gRPC: RESOURCE_EXHAUSTED)."""
    grpc_port: int | None = None
    """Port of the public gRPC API (proto/public.proto) on `hostname`; None (default) serves none, 0 picks
    a free port."""
    worker_connect_timeout_s: float = 600.0
    step_timeout_floor_s: float = 120.0
    """STEP_TIMEOUT_FLOOR: the least time a step may take before its ranks are taken as hung (and the
    whole deadline until a step is measured: it must hold a first forward that compiles kernels)."""
    step_timeout_factor: float = 10.0
    """STEP_TIMEOUT_FACTOR: a step's deadline is this times its tokens times the slowest recent forward
    time per token, if that is more than the floor (router/step_deadline.py)."""
    launcher_pid: int | None = None
    """The launcher's pid, set by the launcher: a rank found hung is reported to it with HUNG_RANK_SIGNAL,
    and it stops everything as for a dead rank (launch/supervision.py)."""

    def tenant_keys(self) -> dict[str, str]:
        """Every key the server accepts, by tenant name: API_KEYS, and API_KEY as tenant `default`."""
        keys = dict(self.api_keys)
        if self.api_key is not None:
            keys.setdefault(DEFAULT_TENANT, self.api_key)
        return keys


DEFAULT_TENANT = "default"
"""The tenant of API_KEY (API_KEYS may not name another tenant so)."""

HUNG_RANK_SIGNAL = signal.SIGUSR1
"""How the router tells the launcher (`launcher_pid`) that a worker rank missed a step deadline."""
