"""Bad adapters at startup stop it: the launcher exits non-zero naming the adapter, and nothing is ever
served (the HTTP port never accepts a connection) with a part of the adapters loaded."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e.harness import Server

pytestmark = pytest.mark.slow

NAME = "broken"


def corrupt_safetensors(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    (out / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return out


def missing_config(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    (out / "adapter_config.json").unlink()
    return out


def wrong_shapes(good: Path, out: Path) -> Path:
    """One lora_A matrix one column wider than the layer it adapts."""
    shutil.copytree(good, out)
    tensors = load_file(out / "adapter_model.safetensors")
    name = next(n for n in sorted(tensors) if "lora_A" in n)
    rank, width = tensors[name].shape
    tensors[name] = torch.zeros(rank, width + 1, dtype=tensors[name].dtype)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def missing_dir(good: Path, out: Path) -> Path:
    return out  # never created


def never_serves(server: Server, timeout_s: float = 240.0) -> bool:
    """Wait for the launcher to exit; True if its HTTP port never accepted a connection meanwhile."""
    deadline = time.monotonic() + timeout_s
    while server.proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", server.port)) == 0:
                return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (corrupt_safetensors, "corrupt"),
        (missing_config, "no adapter_config.json"),
        (wrong_shapes, "has shape"),
        (missing_dir, "neither an existing local directory"),
    ],
    ids=["corrupt_safetensors", "missing_config", "wrong_shapes", "missing_dir"],
)
def test_bad_adapter_stops_startup_naming_it(launch, e2e_model_dir, e2e_adapters, tmp_path, make, reason):
    bad = make(e2e_adapters["b_r8"], tmp_path / "adapter")
    # A good adapter first: it loads before the bad one fails, and must not be served alone.
    server = launch(e2e_model_dir, {"a_r4": e2e_adapters["a_r4"], NAME: bad})
    assert never_serves(server), server.log()
    code = server.wait(timeout=60)
    log = server.log()
    assert code != 0, log
    errors = [line for line in log.splitlines() if " ERROR " in line or "Error" in line]
    named = [line for line in errors if repr(NAME) in line or f"{NAME}=" in line]
    assert any(reason in line for line in named), log
    assert "Router listening" not in log
