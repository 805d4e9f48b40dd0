"""The launcher's settings: every one a CLI flag and an environment variable with TGI's name.

`Settings` is read once (`load_settings`), from CLI flags over the environment and nowhere else; a bad
value is a `SettingsError` naming the setting by both names. `settings_table` renders the README's table.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from launch import nodes
from launch.dtype import auto_dtype
from launch.model_source import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID
from router.config import DEFAULT_TENANT, RouterConfig

CPU_KV_CACHE_MEMORY = 1 << 30
# MAX_LORA_ADAPTERS auto: the LORA_ADAPTERS plus this many slots for adapters loaded at runtime (a slot
# is a number, not memory: ADAPTER_MEMORY bounds what is resident).
RUNTIME_ADAPTER_SLOTS = 1024
# MAX_LORA_RANK auto: a cap on what loads (adapters take their true size), at least the largest configured.
AUTO_MAX_LORA_RANK = 256
CPU_ADAPTER_MEMORY = 1 << 30
CUDA_ADAPTER_MEMORY = 4 << 30
CPU_ADAPTER_HOST_MEMORY = 1 << 30
CUDA_ADAPTER_HOST_MEMORY = 4 << 30


def _router_default(name: str) -> Any:
    return RouterConfig.model_fields[name].default


class Settings(BaseSettings):
    """Every launcher setting. `auto` (the CLI spelling of None) means derived at startup."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="forbid",
        cli_prog_name="launcher.py",
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        cli_parse_none_str="auto",
        env_parse_none_str="auto",
        cli_implicit_flags=False,
    )

    model_id: str = Field(DEFAULT_MODEL_ID, description="Base model: a Hugging Face repo id or a local dir.")
    revision: str | None = Field(None, description="Hub revision of MODEL_ID (auto: the default branch).")
    num_shard: int = Field(1, ge=1, description="Tensor-parallel worker ranks (processes).")
    hostname: str = Field(
        _router_default("hostname"),
        description="Address the HTTP server binds (on nodes other than 0: the ranks' gRPC ports).",
    )
    port: int = Field(_router_default("port"), ge=1, le=65535, description="HTTP port.")
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="cpu or cuda (auto: cuda when available)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None,
        description="Weights and activations. auto: bfloat16 on a GPU with bf16, else float16; on the CPU "
        "bfloat16 with avx512_bf16 or AMX, else float32 (bf16 matmuls are emulated there).",
    )
    lora_adapters: str = Field(
        "",
        description="Comma-separated adapters: `org/name`, `org/name@revision`, `name=/local/dir` or "
        "`name=org/repo[@revision]`. Requests pick one with parameters.adapter_id (`name`, else "
        "`org/name`). Empty: none.",
    )
    lora_adapter_roots: str = Field(
        "",
        description="Comma-separated directories where an adapter_id that is not loaded is looked up "
        "before the Hugging Face cache: `name` or `org/name` is the PEFT directory `<root>/name` or "
        "`<root>/org/name` (the first root holding it wins). Each must be an existing directory. Empty: "
        "none.",
    )
    adapter_download: bool = Field(
        False,
        description="Download from the Hub an adapter_id (or a load request's repo id) found neither in "
        "a root nor in the Hugging Face cache. Off by default: any client could otherwise make the server "
        "download any repo.",
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="Largest LoRA rank an adapter may have, a cap and not a reservation (each adapter "
        "takes its true size in ADAPTER_MEMORY); one above it is refused with a message naming MAX_LORA_RANK "
        f"(auto: {AUTO_MAX_LORA_RANK}, or the largest configured if above).",
    )
    max_lora_adapters: int | None = Field(
        None,
        ge=0,
        description="Adapters resident at once: the LORA_ADAPTERS (pinned) and those loaded at runtime, "
        "evicted least recently used when this many are resident or ADAPTER_MEMORY is full (auto: the "
        f"number of LORA_ADAPTERS + {RUNTIME_ADAPTER_SLOTS}).",
    )
    adapter_memory: ByteSize | None = Field(
        None,
        gt=0,
        description="Adapter pool per rank that the LoRA ops read, bytes or e.g. `2GiB`; adapters take "
        "their true size (rank rows of the modules they target). On CUDA it is GPU memory, allocated before "
        "the KV cache (auto: 1GiB on CPU, 4GiB on CUDA).",
    )
    adapter_host_memory: ByteSize | None = Field(
        None,
        ge=0,
        description="Host copies per rank of evicted adapters, converted and sharded (pinned on CUDA), so "
        "loading one again is a copy, not a file read; 0 turns the tier off (auto: 1GiB on CPU, 4GiB on "
        "CUDA).",
    )
    adapter_load_priority: Literal["idle"] | Annotated[int, Field(ge=0, le=19)] = Field(
        "idle",
        description="CPU priority of each rank's adapter reader process (reading, validating, converting "
        "adapter files): `idle` runs it only on cores the steps leave idle, so loads never slow running "
        "requests but wait while the CPU is saturated; a nice value 0-19 gives loads a share of a busy core "
        "(10: about a tenth) at that cost to the steps.",
    )
    native_cpu_kernels: bool = Field(
        True,
        description="On the CPU, run LoRA, paged attention and the small fused ops with the C++ kernels "
        "(csrc/*_cpu.cpp, compiled on first use into MULTILORA_CACHE/cpu_kernels for this CPU); false, or "
        "no compiler: the torch paths.",
    )
    max_input_tokens: int | None = Field(None, ge=1, description="auto: from the model and KV cache.")
    max_total_tokens: int | None = Field(None, ge=2, description="Prompt + generated tokens per request.")
    max_batch_prefill_tokens: int = Field(
        _router_default("max_batch_prefill_tokens"), ge=1, description="Prompt tokens per prefill step."
    )
    max_batch_total_tokens: int | None = Field(
        None,
        ge=1,
        description="KV tokens the running batch may hold, in whole blocks; a sequence growing past it "
        "preempts the newest admitted (auto: what the KV cache holds).",
    )
    max_batch_size: int | None = Field(None, ge=1, description="auto: no limit but the token budgets.")
    api_key: str = Field(
        "", description="When set, generation requests need `Authorization: Bearer <API_KEY>`. Empty: open."
    )
    api_keys: str = Field(
        "",
        description="Several keys, one per tenant: comma-separated `tenant=key`. Each opens what API_KEY "
        "opens (which counts as tenant `default`); with two or more keys the queue is fair per tenant, then "
        "per adapter within each. Empty: none.",
    )
    tenant_weights: str = Field(
        "",
        description="Comma-separated `tenant=weight`: a tenant's share of the server relative to the "
        "others' (absent: 1).",
    )
    adapter_weights: str = Field(
        "",
        description="Comma-separated `adapter_id=weight` (the base model: its MODEL_ID): an adapter's share "
        "relative to the others' (absent: 1).",
    )
    adapter_queue_share: float = Field(
        _router_default("adapter_queue_share"),
        gt=0,
        le=1,
        description="Fraction of MAX_CONCURRENT_REQUESTS one adapter's requests may hold waiting; more are "
        "answered 429 naming the adapter.",
    )
    payload_limit: int = Field(
        _router_default("payload_limit"), ge=1, description="Largest request body, bytes."
    )
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the public gRPC API, 0: a free one (auto: not served)."
    )
    max_concurrent_requests: int = Field(
        _router_default("max_concurrent_requests"), ge=1, description="More are answered with 429."
    )
    max_stop_sequences: int = Field(
        _router_default("max_stop_sequences"), ge=0, description="Most `stop` strings per request."
    )
    max_top_n_tokens: int = Field(
        _router_default("max_top_n_tokens"), ge=0, description="Largest `top_n_tokens` per request."
    )
    max_best_of: int = Field(_router_default("max_best_of"), ge=1, description="Largest `best_of`.")
    waiting_served_ratio: float = Field(
        _router_default("waiting_served_ratio"),
        ge=0,
        description=(
            "Waiting/running ratio above which queued requests join a running batch. TGI's default is "
            "0.3; here 0: a join step costs the batch only the newcomers' prompt rows (docs/benchmarks.md)."
        ),
    )
    max_waiting_tokens: int = Field(
        _router_default("max_waiting_tokens"),
        ge=0,
        description="Decode steps after which waiting requests join anyway.",
    )
    step_timeout_floor: float = Field(
        _router_default("step_timeout_floor_s"),
        gt=0,
        description=(
            "Seconds a step may always take before its worker ranks are taken as hung (its requests get "
            "424, /health 503, the launcher exits 1); alone until a step is measured: holds a first forward."
        ),
    )
    step_timeout_factor: float = Field(
        _router_default("step_timeout_factor"),
        ge=1,
        description="A step's deadline above the floor: this x its tokens x the slowest recent time/token.",
    )
    kv_cache_memory: ByteSize | None = Field(
        None,
        gt=0,
        description="KV cache per rank, bytes or e.g. `1GiB` (auto: 1GiB on CPU; on CUDA what "
        "CUDA_MEMORY_FRACTION leaves after a profiled step).",
    )
    cuda_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of each GPU this server may use. Without KV_CACHE_MEMORY, the KV cache gets what "
        "weights, ADAPTER_MEMORY and a step of MAX_BATCH_PREFILL_TOKENS leave of it.",
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV cache block.")
    shard_uds_path: Path | None = Field(
        None,
        description="Worker sockets go in a private dir next to this path, named `<name>-<rank>` "
        "(auto: a fresh temporary dir).",
    )
    master_addr: str = Field("127.0.0.1", description="torch.distributed rendezvous address (NUM_SHARD>1).")
    master_port: int = Field(29500, ge=1, le=65535, description="torch.distributed rendezvous port.")
    num_nodes: int = Field(
        1, ge=1, description="Nodes (pods) one tensor-parallel group spans; NUM_SHARD counts all their ranks."
    )
    node_rank: int = Field(
        0,
        ge=0,
        description="This node's index: it starts ranks NODE_RANK*L .. NODE_RANK*L+L-1 (L = NUM_SHARD/"
        "NUM_NODES); node 0 also runs the router, at MASTER_ADDR.",
    )
    worker_addresses: str = Field(
        "",
        description="Node 0 of several: comma-separated `host[:port]` of nodes 1..NUM_NODES-1, where the "
        "router reaches their ranks (port: their WORKER_PORT_BASE).",
    )
    worker_port_base: int = Field(
        29600,
        ge=1,
        le=65535,
        description="Nodes other than 0: local rank i serves gRPC on TCP HOSTNAME:WORKER_PORT_BASE+i.",
    )
    worker_token: str = Field(
        "",
        description="Shared secret of a multi-node group (needed when NUM_NODES>1): the TCP ranks refuse "
        "calls without it.",
    )
    huggingface_hub_cache: Path | None = Field(
        None, description="Hugging Face hub cache (auto: huggingface_hub's default)."
    )
    multilora_cache: Path = Field(
        Path(DEFAULT_CACHE_DIR), description="multilora's cache (the converted default model)."
    )
    graceful_termination_timeout: float = Field(
        90.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM before a kill."
    )

    @field_validator("lora_adapter_roots")
    @classmethod
    def _absolute_roots(cls, text: str) -> str:
        """Each root must be an existing directory; stored as absolute paths, comma-separated."""
        if not text.strip():
            return ""
        roots = []
        for position, raw in enumerate(text.split(","), start=1):
            entry = raw.strip()
            if not entry:
                raise ValueError(f"entry {position} is empty")
            root = os.path.abspath(os.path.expanduser(entry))
            if not os.path.isdir(root):
                what = "is not a directory" if os.path.exists(root) else "does not exist"
                raise ValueError(f"adapter root {entry!r} ({root}) {what}")
            roots.append(root)
        return ",".join(roots)

    @field_validator("api_keys", "tenant_weights", "adapter_weights")
    @classmethod
    def _pairs_parse(cls, text: str, info: ValidationInfo) -> str:
        """Each must parse (`tenant_keys`, `weights`); stored as written."""
        pairs = _pairs(text)
        if info.field_name != "api_keys":
            for name, weight in pairs.items():
                try:
                    ok = float(weight) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"the weight of {name!r} must be a number > 0, got {weight!r}")
        elif any(not key for key in pairs.values()):
            raise ValueError("a tenant's key is empty")
        return text

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        limits = (self.max_input_tokens, self.max_total_tokens)
        if None not in limits and limits[0] >= limits[1]:  # type: ignore[operator]
            raise ValueError(
                f"MAX_INPUT_TOKENS ({limits[0]}) must be less than MAX_TOTAL_TOKENS ({limits[1]})"
            )
        problems = nodes.check(
            self.node_layout, self.worker_addresses, self.worker_port_base, self.worker_token
        )
        if problems:
            raise ValueError("\n  ".join(problems))
        if self.api_key and DEFAULT_TENANT in self.tenant_keys():
            raise ValueError(f"API_KEYS names tenant {DEFAULT_TENANT!r}, which is API_KEY's")
        return self

    @property
    def node_layout(self) -> nodes.NodeLayout:
        return nodes.NodeLayout(self.num_shard, self.num_nodes, self.node_rank)

    def tenant_keys(self) -> dict[str, str]:
        """API_KEYS as tenant -> key."""
        return _pairs(self.api_keys)

    def weights(self, field: Literal["tenant_weights", "adapter_weights"]) -> dict[str, float]:
        """TENANT_WEIGHTS or ADAPTER_WEIGHTS as name -> weight."""
        return {name: float(weight) for name, weight in _pairs(getattr(self, field)).items()}

    @property
    def adapter_roots(self) -> list[str]:
        """LORA_ADAPTER_ROOTS as absolute paths, in order."""
        return self.lora_adapter_roots.split(",") if self.lora_adapter_roots else []

    def hf_cache_dir(self) -> Path | None:
        """HUGGINGFACE_HUB_CACHE, absolute, `~` expanded (None: huggingface_hub's default)."""
        cache = self.huggingface_hub_cache
        return cache.expanduser().absolute() if cache is not None else None

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, device: str) -> str:
        return self.dtype if self.dtype is not None else auto_dtype(device).dtype

    def adapter_load_nice(self) -> int | None:
        """ADAPTER_LOAD_PRIORITY as the worker's nice value; None for `idle` (SCHED_IDLE)."""
        return None if self.adapter_load_priority == "idle" else int(self.adapter_load_priority)

    def resolved_adapter_memory(self, device: str) -> tuple[int, int]:
        """(ADAPTER_MEMORY, ADAPTER_HOST_MEMORY) in bytes."""
        pool = CUDA_ADAPTER_MEMORY if device == "cuda" else CPU_ADAPTER_MEMORY
        host = CUDA_ADAPTER_HOST_MEMORY if device == "cuda" else CPU_ADAPTER_HOST_MEMORY
        if self.adapter_memory is not None:
            pool = int(self.adapter_memory)
        if self.adapter_host_memory is not None:
            host = int(self.adapter_host_memory)
        return pool, host

    def resolved_kv_cache_bytes(self, device: str) -> int | None:
        """KV_CACHE_MEMORY in bytes; None on CUDA without it: each rank plans it from its device."""
        if self.kv_cache_memory is not None:
            return int(self.kv_cache_memory)
        return None if device == "cuda" else CPU_KV_CACHE_MEMORY


def _pairs(text: str) -> dict[str, str]:
    """`name=value,...` as a dict; each name once (a value may hold `=`, not `,`)."""
    pairs: dict[str, str] = {}
    for position, raw in enumerate(text.split(",") if text.strip() else [], start=1):
        name, eq, value = raw.strip().partition("=")
        if not eq or not name.strip():
            raise ValueError(f"entry {position} is not `name=value`")
        if name.strip() in pairs:
            raise ValueError(f"{name.strip()!r} is named twice")
        pairs[name.strip()] = value.strip()
    return pairs


class SettingsError(Exception):
    """A setting (or a LORA_ADAPTERS entry) is invalid; the message names it."""


def env_name(field: str) -> str:
    return field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from `argv` (CLI flags) over the environment; a SettingsError names each bad setting."""
    try:
        return Settings(_cli_parse_args=list(sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None


_SECRET_FIELDS = frozenset({"api_key", "api_keys", "worker_token"})  # a bad value is not echoed


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["loc"]:
            field = str(err["loc"][0])
            got = "" if field in _SECRET_FIELDS else f", got {err['input']!r}"
            lines.append(f"{env_name(field)} ({flag_name(field)}): {msg}{got}")
        else:
            lines.append(msg)
    return "invalid settings:\n  " + "\n  ".join(lines)


def settings_table() -> str:
    """The README's settings table (Markdown), generated from Settings."""
    rows = ["| Env var | Flag | Default | Meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "auto" if default is None else ("(empty)" if default == "" else str(default))
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env_name(name)}` | `{flag_name(name)}` | `{shown}` | {desc} |")
    return "\n".join(rows)
