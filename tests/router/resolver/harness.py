"""What the AdapterResolver tests share: adapter trees, a fake HF cache and Hub, and the guards.

No test reaches the network: sockets fail loudly, and `snapshot_download` is wrapped so that a call
without `local_files_only=True` goes to a fake (or fails the test when none is set). `no_outside_access`
fails a test that opens or lists anything outside the adapter root. The fixtures reach every test module
of this package through its conftest.py (no_network and hub are autouse: they guard every test).
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router import adapter_resolver
from router.adapter_resolver import (
    ADAPTER_FILES,
    AdapterResolver,
)

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40
SHA_DOWNLOADED = "c" * 40


def write_adapter(directory: Path, files: tuple[str, ...] = ADAPTER_FILES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_text(f"{name} of {directory.name}")
    return directory


def cache_repo(
    cache: Path, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",), files=ADAPTER_FILES
) -> Path:
    """A repo in huggingface_hub's cache layout: blobs/, snapshots/<commit>/ symlinks into them, refs/."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name in files:
        blob = storage / "blobs" / f"{commit[:8]}-{name}"
        blob.write_text(f"{name} of {repo_id}@{commit}")
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@dataclass
class Hub:
    """Every snapshot_download call; local ones run for real, the others go to `download`."""

    calls: list[dict] = field(default_factory=list)
    download: Callable[..., str] | None = None

    def remote_calls(self) -> list[dict]:
        return [call for call in self.calls if not call.get("local_files_only")]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("the resolver tried to reach the network")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    yield
    assert attempts == []


@pytest.fixture(autouse=True)
def hub(monkeypatch) -> Hub:
    real = adapter_resolver.snapshot_download
    state = Hub()

    def spy(repo_id, **kwargs):
        state.calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        if state.download is None:
            raise AssertionError(f"unexpected Hub download of {repo_id}")
        return state.download(repo_id, **kwargs)

    monkeypatch.setattr(adapter_resolver, "snapshot_download", spy)
    return state


@pytest.fixture
def tree(tmp_path):
    """Two roots, an HF cache and an `outside` directory holding a complete adapter and a secret."""
    paths = {name: tmp_path / name for name in ("r1", "r2", "hf-cache", "outside")}
    for path in paths.values():
        path.mkdir()
    write_adapter(paths["outside"] / "adapter")
    (paths["outside"] / "secret").write_text("secret")
    return paths


@pytest.fixture
def make(tree) -> Callable[..., AdapterResolver]:
    def make(roots=("r1", "r2"), allow_download=False) -> AdapterResolver:
        return AdapterResolver([tree[r] for r in roots], tree["hf-cache"], allow_download)

    return make


def fake_download(commit: str = SHA_DOWNLOADED, files=(*ADAPTER_FILES, "README.md", "adapter_model.bin")):
    """A Hub download writing the files that match `allow_patterns` into the cache."""

    def download(repo_id, *, revision, cache_dir, allow_patterns, **_):
        kept = tuple(f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        return str(cache_repo(Path(cache_dir), repo_id, commit, refs=(revision or "main",), files=kept))

    return download


@pytest.fixture
def no_outside_access(monkeypatch, tree) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context inside which nothing under `outside` may be opened or listed (checked on leaving it)."""
    outside = os.path.realpath(tree["outside"])
    seen: list[str] = []
    active = False

    def recording(original):
        def wrapper(*args, **kwargs):
            if active and args and isinstance(args[0], str | bytes | os.PathLike):
                seen.append(os.path.realpath(os.fsdecode(args[0])))
            return original(*args, **kwargs)

        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))

    @contextlib.contextmanager
    def watching():
        nonlocal active
        seen.clear()
        active = True
        try:
            yield
        finally:
            active = False
        assert [p for p in seen if os.path.commonpath([p, outside]) == outside] == []

    return watching
