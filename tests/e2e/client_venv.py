"""A cached virtual environment holding one pinned client package, for clients that cannot share our venv.

huggingface_hub 0.36 (what text-generation and lorax-client pin) cannot be installed next to transformers
5, which needs huggingface_hub >= 1.0, so its tests run a script in a venv of its own. The venv lives
under `$MULTILORA_CACHE/client-venvs/` (default `~/.cache/multilora`), keyed by the requirement and the
Python version; the first build takes pip's time (about 15 s), later runs reuse it. A file lock makes
concurrent test sessions build it once; a venv whose build did not finish is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_TIMEOUT_S = 600


def cache_root() -> Path:
    return Path(os.environ.get("MULTILORA_CACHE") or "~/.cache/multilora").expanduser() / "client-venvs"


def client_venv(requirement: str) -> Path:
    """The Python interpreter of a venv in which `requirement` (a pip spec) is installed."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in requirement)
    digest = hashlib.sha256(requirement.encode()).hexdigest()[:8]
    root = cache_root() / f"{name}-{digest}-{version}"
    python, done = root / "bin" / "python", root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and done.read_text() == requirement:
            return python
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(root)])
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement])
        done.write_text(requirement)
    return python


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
