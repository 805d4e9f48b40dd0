"""Start `launcher.py` as a subprocess and talk HTTP to it (stdlib only), for the e2e tests and the bench."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One launcher process on a free port; its whole output goes to `log_path`."""

    def __init__(self, log_path: Path, *, env: dict[str, str] | None = None, args: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        full_env.update(
            {
                "PORT": str(self.port),
                "HOSTNAME": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
        )
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launcher.py"), *args],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", self.log())}

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until GET /health answers 200; fails early with the log if the launcher exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if get(self.url + "/health", timeout=5)[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def generate(self, inputs: str, timeout: float = 300.0, **parameters) -> tuple[int, dict]:
        return post(self.url + "/generate", {"inputs": inputs, "parameters": parameters}, timeout=timeout)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> int:
        """The launcher's exit code; asserts that none of its children is left (running or zombie)."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        for name, pid in self.child_pids().items():
            assert not _alive_or_zombie(pid), f"{name} (pid {pid}) outlived the launcher:\n{self.log()}"
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()


@contextlib.contextmanager
def running(log_path: Path, env: dict[str, str]) -> Iterator[Server]:
    """A ready Server, stopped on exit; the stop must exit 0."""
    server = Server(log_path, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log()


# The launcher's own settings must come from the test, not from the environment pytest runs in.
_LAUNCHER_ENV = {
    "MODEL_ID", "REVISION", "NUM_SHARD", "HOSTNAME", "PORT", "DEVICE", "DTYPE", "LORA_ADAPTERS",
    "LORA_ADAPTER_ROOTS", "ADAPTER_DOWNLOAD", "ADAPTER_MEMORY", "ADAPTER_HOST_MEMORY",
    "ADAPTER_LOAD_PRIORITY", "NATIVE_CPU_KERNELS",
    "MAX_LORA_RANK", "MAX_LORA_ADAPTERS", "MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS",
    "MAX_BATCH_TOTAL_TOKENS", "MAX_BATCH_SIZE", "MAX_CONCURRENT_REQUESTS", "KV_CACHE_MEMORY", "BLOCK_SIZE",
    "CUDA_MEMORY_FRACTION",
    "SHARD_UDS_PATH", "MASTER_ADDR", "MASTER_PORT", "GRACEFUL_TERMINATION_TIMEOUT", "NUM_NODES", "NODE_RANK",
    "WORKER_ADDRESSES", "WORKER_PORT_BASE", "WORKER_TOKEN", "API_KEY", "PAYLOAD_LIMIT", "GRPC_PORT",
    "MAX_STOP_SEQUENCES", "MAX_TOP_N_TOKENS", "MAX_BEST_OF", "WAITING_SERVED_RATIO", "MAX_WAITING_TOKENS",
    "API_KEYS", "TENANT_WEIGHTS", "ADAPTER_WEIGHTS", "ADAPTER_QUEUE_SHARE", "STEP_TIMEOUT_FLOOR",
    "STEP_TIMEOUT_FACTOR",
}  # fmt: skip
# Settings the tests may inherit: where the caches are.
INHERITED_ENV = {"HUGGINGFACE_HUB_CACHE", "MULTILORA_CACHE"}


def _alive_or_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
    """The status and the JSON reply; a reply that is not JSON comes as {"text": ...} (an error's as
    {"error": ...})."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, _json_or(resp.read(), "text")
    except urllib.error.HTTPError as err:
        return err.code, _json_or(err.read(), "error")


def _json_or(payload: bytes, key: str) -> dict:
    try:
        return json.loads(payload)
    except ValueError:
        return {key: payload.decode(errors="replace")}
