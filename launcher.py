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
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ByteSize, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import launcher_nodes
from router.config import AdapterSource, RouterConfig
from worker.model_source import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID, ModelSourceError

if TYPE_CHECKING:
    from worker.config import WorkerConfig  # imports torch: only where configs are built

logger = logging.getLogger("launcher")

ROOT = Path(__file__).resolve().parent
# An adapter can never be named like this: OpenAI requests use `model: "tgi"` for the base model (TGI).
RESERVED_ADAPTER_IDS = ("tgi",)
# LoRA rank the workers reserve when no adapter is configured (LoRA is then off: zero slots).
FALLBACK_LORA_RANK = 8
CPU_KV_CACHE_MEMORY = 1 << 30
CUDA_KV_CACHE_MEMORY = 8 << 30
# Extra time given to a child past its own graceful window before it is killed.
KILL_GRACE_S = 10.0
# After a child died the others cannot serve: they get this long to stop before being killed.
FAILURE_STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
# A shutdown signal repeated at least this long after the first one kills the children at once.
FORCE_AFTER_S = 1.0
UDS_MAX_BYTES = 107  # sun_path is 108 bytes with the trailing NUL
# Settings the children must not inherit from the launcher's environment (they get them in their config).
SECRET_ENV = ("API_KEY", "WORKER_TOKEN")


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
        None, description="Weights and activations. auto: bfloat16 (float16 on a GPU without bf16)."
    )
    lora_adapters: str = Field(
        "",
        description="Comma-separated adapters: `org/name`, `org/name@revision`, `name=/local/dir` or "
        "`name=org/repo[@revision]`. Requests pick one with parameters.adapter_id (`name`, else "
        "`org/name`). Empty: none.",
    )
    max_lora_rank: int | None = Field(
        None, ge=1, description="Largest adapter rank the workers reserve (auto: the largest configured)."
    )
    max_lora_adapters: int | None = Field(
        None, ge=0, description="Adapter slots per worker (auto: the number of LORA_ADAPTERS)."
    )
    max_input_tokens: int | None = Field(None, ge=1, description="auto: from the model and KV cache.")
    max_total_tokens: int | None = Field(None, ge=2, description="Prompt + generated tokens per request.")
    max_batch_prefill_tokens: int = Field(
        _router_default("max_batch_prefill_tokens"), ge=1, description="Prompt tokens per prefill step."
    )
    max_batch_total_tokens: int | None = Field(None, ge=1, description="auto: what the KV cache holds.")
    max_batch_size: int | None = Field(None, ge=1, description="auto: no limit but the token budgets.")
    api_key: str = Field(
        "", description="When set, generation requests need `Authorization: Bearer <API_KEY>`. Empty: open."
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
        description="Waiting/running ratio above which queued requests join a running batch.",
    )
    max_waiting_tokens: int = Field(
        _router_default("max_waiting_tokens"),
        ge=0,
        description="Decode steps after which waiting requests join anyway.",
    )
    kv_cache_memory: ByteSize | None = Field(
        None, gt=0, description="KV cache per rank, bytes or e.g. `1GiB` (auto: 1GiB on CPU, 8GiB on CUDA)."
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

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        limits = (self.max_input_tokens, self.max_total_tokens)
        if None not in limits and limits[0] >= limits[1]:  # type: ignore[operator]
            raise ValueError(
                f"MAX_INPUT_TOKENS ({limits[0]}) must be less than MAX_TOTAL_TOKENS ({limits[1]})"
            )
        problems = launcher_nodes.check(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, device: str) -> str:
        if self.dtype is not None:
            return self.dtype
        if device == "cuda":
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16"

    def resolved_kv_cache_bytes(self, device: str) -> int:
        if self.kv_cache_memory is not None:
            return int(self.kv_cache_memory)
        return CUDA_KV_CACHE_MEMORY if device == "cuda" else CPU_KV_CACHE_MEMORY


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


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["loc"]:
            field = str(err["loc"][0])
            lines.append(f"{env_name(field)} ({flag_name(field)}): {msg}, got {err['input']!r}")
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


# ---- LORA_ADAPTERS -------------------------------------------------------------------------------

# TGI's grammar (server/text_generation_server/utils/adapter.py): source, `name=source`, optional `@rev`.
_ENTRY_RE = re.compile(r"^([^=@]+)(?:=([^@]+))?(?:@(.+))?$")


@dataclass(frozen=True)
class AdapterSpec:
    """One LORA_ADAPTERS entry, parsed."""

    entry: str  # as written, for error messages
    id: str  # what requests pass as adapter_id
    source: str  # hub repo id or local path
    revision: str | None


@dataclass(frozen=True)
class ResolvedAdapter:
    spec: AdapterSpec
    path: Path
    rank: int


def parse_lora_adapters(text: str) -> list[AdapterSpec]:
    """Parse LORA_ADAPTERS; raises SettingsError naming the first bad entry."""
    if not text.strip():
        return []
    specs: list[AdapterSpec] = []
    seen: dict[str, str] = {}
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        where = f"LORA_ADAPTERS entry {position} {entry!r}"
        if not entry:
            raise SettingsError(f"LORA_ADAPTERS entry {position} is empty (in {text!r})")
        match = _ENTRY_RE.match(entry)
        if match is None or entry.count("=") > 1 or entry.count("@") > 1:
            raise SettingsError(
                f"{where}: expected `org/name`, `org/name@revision`, `name=/local/dir` or "
                "`name=org/repo@revision` (at most one `=` and one `@`)"
            )
        first, second, revision = (g.strip() if g is not None else None for g in match.groups())
        name, source = (first, second) if second is not None else (first, first)
        if not name:
            raise SettingsError(f"{where}: the adapter name before `=` is empty")
        if not source:
            raise SettingsError(f"{where}: the path or repo id after `=` is empty")
        if revision == "":
            raise SettingsError(f"{where}: the revision after `@` is empty")
        if re.search(r"\s", name):
            raise SettingsError(f"{where}: the adapter name {name!r} contains whitespace")
        if name in RESERVED_ADAPTER_IDS:
            raise SettingsError(f"{where}: {name!r} is reserved (OpenAI requests use it for the base model)")
        if name in seen:
            raise SettingsError(f"{where}: adapter id {name!r} is already used by entry {seen[name]!r}")
        seen[name] = entry
        specs.append(AdapterSpec(entry=entry, id=name, source=source, revision=revision))
    return specs


def adapter_rank(path: Path) -> int:
    """The largest LoRA rank in `path/adapter_config.json` (`r` and every `rank_pattern` value)."""
    config_file = path / "adapter_config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    ranks = [raw.get("r"), *(raw.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"{config_file}: ranks {ranks!r} (r and rank_pattern) must be positive integers")
    return max(ranks)


def resolve_adapters(specs: list[AdapterSpec], hf_cache_dir: Path | None) -> list[ResolvedAdapter]:
    """Local directories (downloaded when needed) and ranks of the adapters; SettingsError names the entry."""
    from worker.model_source import resolve_adapter_dir

    resolved = []
    for spec in specs:
        try:
            path = resolve_adapter_dir(spec.source, spec.revision, hf_cache_dir=hf_cache_dir)
            resolved.append(ResolvedAdapter(spec, path, adapter_rank(path)))
        except (ModelSourceError, ValueError) as exc:
            raise SettingsError(f"LORA_ADAPTERS entry {spec.entry!r}: {exc}") from None
    return resolved


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


# ---- process supervision -------------------------------------------------------------------------

_output_lock = threading.Lock()


_libc: Any = None


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGTERM when the launcher dies, even by SIGKILL, so no rank outlives it.
    # libc is loaded in the parent: nothing here may take a lock another thread could have held at fork.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process in its own process group, its output forwarded line by line with a prefix."""

    def __init__(self, name: str, argv: list[str], stdin: bytes | None = None, tail_lines: int = 40) -> None:
        self.name = name
        self.tail: deque[str] = deque(maxlen=tail_lines)
        global _libc
        if _libc is None and sys.platform == "linux":
            _libc = ctypes.CDLL(None)
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's Ctrl-C reaches the launcher only; it orders the shutdown
            preexec_fn=_child_setup,
        )
        self.pid = self.popen.pid
        if stdin is not None:
            self._feed(stdin)
        self._reader = threading.Thread(target=self._forward, name=f"output-{name}", daemon=True)
        self._reader.start()
        logger.info("started %s (pid %d)", name, self.pid)

    def _feed(self, data: bytes) -> None:
        """Write `data` to the child's stdin and close it (a child that died early reports itself)."""
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.write(data)
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.close()

    def _forward(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            with _output_lock:
                sys.stderr.write(f"{self.name} | {line}\n")
                sys.stderr.flush()
        self.popen.stdout.close()

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def reap(self) -> int:
        """Wait for the exited process, kill stragglers of its group, finish forwarding its output."""
        code = self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._reader.join(timeout=2.0)
        return code

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return f"{self.name} (pid {self.pid}) is running"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{self.name} (pid {self.pid}) {how}"

    def failure_report(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return f"{self.describe_exit()}; its last output:\n{tail}"


class ShutdownRequested(Exception):
    pass


class Supervisor:
    """Starts children, watches them and the shutdown signals, and stops them in order."""

    def __init__(self, graceful_timeout_s: float) -> None:
        self.graceful_timeout_s = graceful_timeout_s
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.force = threading.Event()
        self._first_signal_at: float | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        # A repeat within FORCE_AFTER_S is the same request delivered twice (GNU make forwards SIGTERM to
        # the launcher that also got it as a group member); a later one (a second Ctrl-C) forces.
        # State changes come before logging: a handler can run nested inside another one.
        now, first = time.monotonic(), self._first_signal_at
        if first is None:
            self._first_signal_at = now
            self.stop_requested.set()
            logger.info("received %s: shutting down", signal.Signals(signum).name)
        elif now - first >= FORCE_AFTER_S and not self.force.is_set():
            self.force.set()
            logger.warning("%s again: killing everything now", signal.Signals(signum).name)

    def start(self, name: str, argv: list[str], stdin: bytes | None = None) -> Child:
        child = Child(name, argv, stdin)
        self.children.append(child)
        return child

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if c.poll() is not None), None)

    def wait_until(self, ready: Callable[[], bool], what: str, log_every_s: float = 10.0) -> Child | None:
        """Block until `ready()`; return a child that died meanwhile, or raise ShutdownRequested."""
        last_log = time.monotonic()
        while True:
            if self.stop_requested.is_set():
                raise ShutdownRequested
            dead = self.first_dead()
            if dead is not None:
                return dead
            if ready():
                return None
            if time.monotonic() - last_log >= log_every_s:
                logger.info("waiting for %s to be ready...", what)
                last_log = time.monotonic()
            time.sleep(POLL_S)

    def stop(self, children: list[Child], timeout_s: float) -> bool:
        """SIGTERM `children` together, SIGKILL those still running after `timeout_s`; True if all clean."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(c.poll() is None for c in children) and time.monotonic() < deadline:
            if self.force.is_set():
                break
            time.sleep(POLL_S)
        clean = True
        for child in children:
            if child.poll() is None:
                logger.warning("%s did not stop within %.0f s: killing it", child.name, timeout_s)
                child.signal(signal.SIGKILL)
            # Dying of our SIGTERM is a clean stop too (a worker still loading has no handler yet).
            if child.reap() not in (0, -signal.SIGTERM):
                logger.warning("%s", child.describe_exit())
                clean = False
        return clean

    def stop_all(self, *, failed: bool) -> bool:
        """Stop the router (graceful window) then the workers; after a failure, everything briefly."""
        routers = [c for c in self.children if c.name == "router"]
        workers = [c for c in self.children if c.name != "router"]
        if failed:
            self.stop(routers + workers, min(self.graceful_timeout_s, FAILURE_STOP_TIMEOUT_S))
            return False
        clean = self.stop(routers, self.graceful_timeout_s + KILL_GRACE_S)
        return self.stop(workers, self.graceful_timeout_s + KILL_GRACE_S) and clean


def worker_listening(uds_path: str) -> bool:
    """True when the worker's gRPC server accepts connections on `uds_path`, which it binds once its model
    is loaded (the router then waits for every rank's Health RPC itself).

    Deliberately not a gRPC call: a process that has used gRPC can abort or deadlock the children it forks
    afterwards (grpc/grpc#43055: gRPC's at-fork handlers restart its poller in the child, whose fds
    subprocess then closes before exec), and the launcher forks the router after these checks.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(uds_path)
        except OSError:
            return False
    return True


def supervise(
    worker_argvs: list[list[str]],
    router_argv: list[str] | None,
    worker_ready: Callable[[int], bool],
    graceful_timeout_s: float,
    router_stdin: bytes | None = None,
    worker_ranks: Sequence[int] | None = None,
    worker_stdin: bytes | None = None,
) -> int:
    """Run the workers (global ranks `worker_ranks`, default 0..; `worker_stdin` on their stdin) until
    ready, then the router (`router_stdin` on its stdin; None: none, on a node other than 0), until a
    signal or a death; return the exit code."""
    sup = Supervisor(graceful_timeout_s)
    previous = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    ranks = list(range(len(worker_argvs)) if worker_ranks is None else worker_ranks)
    try:
        return _run(
            sup,
            list(zip(ranks, worker_argvs, strict=True)),
            worker_stdin,
            (router_argv, router_stdin),
            worker_ready,
        )
    finally:
        for child in sup.children:  # normally all reaped already; this covers unexpected errors
            if child.poll() is None:
                child.signal(signal.SIGKILL)
            child.reap()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(
    sup: Supervisor,
    workers: list[tuple[int, list[str]]],
    worker_stdin: bytes | None,
    router_command: tuple[list[str] | None, bytes | None],
    worker_ready: Callable[[int], bool],
) -> int:
    try:
        for rank, argv in workers:
            sup.start(f"worker-{rank}", argv, worker_stdin)
        for index, (rank, _) in enumerate(workers):
            dead = sup.wait_until(lambda i=index: worker_ready(i), f"worker-{rank}")
            if dead is not None:
                return _fail(sup, dead)
            logger.info("worker-%d is ready", rank)
        if router_command[0] is None:  # a node other than 0: its ranks serve node 0's router
            dead = sup.wait_until(lambda: False, "workers", log_every_s=math.inf)
            assert dead is not None
            return _fail(sup, dead)
        router = sup.start("router", router_command[0], router_command[1])
        dead = sup.wait_until(lambda: False, "router", log_every_s=math.inf)
    except ShutdownRequested:
        return 0 if sup.stop_all(failed=False) else 1
    assert dead is not None
    if dead is router and dead.poll() == 0:
        logger.info("the router exited; stopping the workers")
        router.reap()
        return 0 if sup.stop_all(failed=False) else 1
    return _fail(sup, dead)


def _fail(sup: Supervisor, dead: Child) -> int:
    dead.reap()
    sup.children.remove(dead)  # reaped and reported here; the others are stopped below
    logger.error("%s", dead.failure_report())
    logger.error("stopping the other processes")
    sup.stop_all(failed=True)
    logger.error("multilora stopped: %s", dead.describe_exit())
    return 1


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
