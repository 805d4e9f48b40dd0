"""AdapterResolver: roots, the HF cache, Hub downloads, adapter_source, and every escape attempt refused.

No test reaches the network: sockets fail loudly, and `snapshot_download` is wrapped so that a call
without `local_files_only=True` goes to a fake (or fails the test when none is set).
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

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from router import adapter_resolver
from router.adapter_resolver import (
    ADAPTER_FILES,
    AdapterDownloadError,
    AdapterNotFoundError,
    AdapterRefusedError,
    AdapterResolveError,
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


def test_the_outside_access_guard_catches_an_open(tree, no_outside_access):
    with pytest.raises(AssertionError), no_outside_access():
        (tree["outside"] / "secret").read_text()


# Roots.


@pytest.mark.parametrize("adapter_id", ["plain", "org/name", "Org.1/name_2-x"])
def test_root_resolves_name_and_org_name(tree, make, adapter_id):
    write_adapter(tree["r1"] / adapter_id)
    got = make().resolve(adapter_id)
    assert (got.id, got.kind, got.revision) == (adapter_id, "root", None)
    assert got.path == (tree["r1"] / adapter_id).resolve()


def test_first_root_holding_the_directory_wins(tree, make):
    write_adapter(tree["r1"] / "both")
    write_adapter(tree["r2"] / "both")
    write_adapter(tree["r2"] / "second")
    resolver = make()
    assert resolver.resolve("both").path == (tree["r1"] / "both").resolve()
    assert resolver.resolve("second").path == (tree["r2"] / "second").resolve()


@pytest.mark.parametrize("missing", ADAPTER_FILES)
def test_root_directory_missing_a_file_is_not_found(tree, make, missing):
    present = tuple(f for f in ADAPTER_FILES if f != missing)
    write_adapter(tree["r1"] / "partial", present)
    write_adapter(tree["r2"] / "partial")  # a later root does not shadow an incomplete first one
    with pytest.raises(AdapterNotFoundError) as info:
        make().resolve("partial")
    assert f"'partial': its directory in adapter root {str(tree['r1'])!r} has no {missing} " in str(
        info.value
    )
    assert info.value.adapter_id == "partial"


def test_not_found_lists_every_place_searched(tree, make):
    with pytest.raises(AdapterNotFoundError) as info:
        make().resolve("org/absent")
    message = str(info.value)
    assert message.startswith("adapter 'org/absent' not found; looked in: ")
    assert f"adapter roots {str(tree['r1'])!r}, {str(tree['r2'])!r}" in message
    assert "the Hugging Face cache" in message
    assert "download disabled: set ADAPTER_DOWNLOAD=true to allow it" in message


def test_not_found_without_roots_says_none_are_configured(make):
    with pytest.raises(AdapterNotFoundError, match=r"no adapter roots configured \(LORA_ADAPTER_ROOTS\)"):
        make(roots=()).resolve("absent")


def test_root_is_searched_before_the_cache(tree, make):
    write_adapter(tree["r1"] / "org" / "name")
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    assert make().resolve("org/name").kind == "root"


# The Hugging Face cache.


def test_cache_resolves_main_to_its_snapshot_and_commit(tree, make, hub):
    snapshot = cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    got = make().resolve("org/name")
    assert (got.kind, got.revision, got.path) == ("hf-cache", SHA_MAIN, snapshot.resolve())
    assert (
        got.path / "adapter_model.safetensors"
    ).read_text() == f"adapter_model.safetensors of org/name@{SHA_MAIN}"
    assert hub.remote_calls() == []
    assert [call["allow_patterns"] for call in hub.calls] == [list(ADAPTER_FILES)]


@pytest.mark.parametrize("revision", [SHA_V1, "v1", "refs/pr/1"])
def test_cache_resolves_commit_branch_and_tag_revisions(tree, make, revision):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    cache_repo(tree["hf-cache"], "org/name", SHA_V1, refs=("v1", "refs/pr/1"))
    got = make().resolve(f"org/name@{revision}")
    assert (got.id, got.kind, got.revision) == (f"org/name@{revision}", "hf-cache", SHA_V1)
    assert got.path.name == SHA_V1


def test_cache_unknown_revision_is_not_found(tree, make):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    with pytest.raises(AdapterNotFoundError, match=r"the Hugging Face cache at revision 'nope'"):
        make().resolve("org/name@nope")


def test_cache_resolves_a_repo_without_org(tree, make):
    cache_repo(tree["hf-cache"], "solo", SHA_MAIN)
    assert make(roots=()).resolve("solo").revision == SHA_MAIN


def test_cache_snapshot_missing_the_weights_is_not_found(tree, make):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN, files=("adapter_config.json",))
    with pytest.raises(
        AdapterNotFoundError, match=r"in the Hugging Face cache has no adapter_model\.safetensors"
    ):
        make().resolve("org/name")


def test_cache_hit_never_downloads_even_when_allowed(tree, make, hub):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    hub.download = fake_download()
    assert make(allow_download=True).resolve("org/name").kind == "hf-cache"
    assert hub.remote_calls() == []


def test_cache_ref_leading_outside_the_repo_folder_is_refused(tree, make, no_outside_access):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    ref = tree["hf-cache"] / "models--org--name" / "refs" / "main"
    ref.write_text("../../../outside/adapter")
    with no_outside_access(), pytest.raises(AdapterRefusedError, match="its cached ref is not a commit sha"):
        make().resolve("org/name")


def test_cache_blob_symlink_leading_outside_is_refused(tree, make, no_outside_access):
    snapshot = cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "adapter_model.safetensors").symlink_to(
        tree["outside"] / "adapter" / "adapter_model.safetensors"
    )
    with no_outside_access(), pytest.raises(AdapterRefusedError) as info:
        make().resolve("org/name")
    assert "its adapter_model.safetensors is a symbolic link leading outside the Hugging Face cache" in str(
        info.value
    )
    assert str(tree["outside"]) not in str(info.value)


# Hub downloads.


def test_download_disabled_says_how_to_allow_it(make, hub):
    with pytest.raises(AdapterNotFoundError, match=r"set ADAPTER_DOWNLOAD=true to allow it"):
        make().resolve("org/remote")
    assert hub.remote_calls() == []


@pytest.mark.parametrize("revision", [None, "v2"])
def test_download_fetches_only_the_adapter_files(tree, make, hub, revision):
    hub.download = fake_download()
    adapter_id = "org/remote" + (f"@{revision}" if revision else "")
    got = make(allow_download=True).resolve(adapter_id)
    assert (got.id, got.kind, got.revision) == (adapter_id, "hub-download", SHA_DOWNLOADED)
    (call,) = hub.remote_calls()
    assert call == {
        "repo_id": "org/remote",
        "revision": revision,
        "cache_dir": tree["hf-cache"],
        "allow_patterns": ["adapter_config.json", "adapter_model.safetensors"],
    }
    assert sorted(p.name for p in got.path.iterdir()) == sorted(ADAPTER_FILES)


def test_download_completes_an_incomplete_cached_snapshot(tree, make, hub):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN, files=("adapter_config.json",))
    hub.download = fake_download()
    assert make(allow_download=True).resolve("org/name").kind == "hub-download"
    assert len(hub.remote_calls()) == 1


def _raise(exc: Exception) -> Callable[..., str]:
    def download(*args, **kwargs):
        raise exc

    return download


def _http_error(cls, status: int) -> Exception:
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("hub said no", response=response)


def test_download_network_failure_is_a_download_error(make, hub):
    hub.download = _raise(OSError("Connection refused\nmore detail"))
    with pytest.raises(AdapterDownloadError) as info:
        make(allow_download=True).resolve("org/remote")
    assert str(info.value) == (
        "adapter 'org/remote': download from the Hugging Face Hub failed (OSError: Connection refused)"
    )


def test_download_of_a_missing_repo_is_not_found(make, hub):
    hub.download = _raise(_http_error(RepositoryNotFoundError, 404))
    with pytest.raises(
        AdapterNotFoundError, match=r"'org/remote' not found; .*the Hub \(RepositoryNotFoundError\)"
    ):
        make(allow_download=True).resolve("org/remote")


def test_download_of_a_gated_repo_is_a_download_error(make, hub):
    hub.download = _raise(_http_error(GatedRepoError, 403))
    with pytest.raises(AdapterDownloadError, match="'org/remote': the Hub repo is gated"):
        make(allow_download=True).resolve("org/remote")


def test_downloaded_repo_without_adapter_files_is_not_found(make, hub):
    hub.download = fake_download(files=("README.md", "pytorch_model.bin"))
    with pytest.raises(AdapterNotFoundError, match="has no adapter_config.json or adapter_model.safetensors"):
        make(allow_download=True).resolve("org/remote")


# adapter_source.


def test_source_local_searches_the_roots_only(tree, make, hub):
    write_adapter(tree["r2"] / "here")
    cache_repo(tree["hf-cache"], "org/cached", SHA_MAIN)
    hub.download = fake_download()
    resolver = make(allow_download=True)
    assert resolver.resolve("here", source="local").kind == "root"
    with pytest.raises(AdapterNotFoundError) as info:
        resolver.resolve("org/cached", source="local")
    assert "Hugging Face cache" not in str(info.value)
    assert hub.calls == []


def test_source_hub_skips_the_roots(tree, make):
    write_adapter(tree["r1"] / "org" / "name")
    write_adapter(tree["r1"] / "only-local")
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    resolver = make()
    assert resolver.resolve("org/name", source="hub").kind == "hf-cache"
    with pytest.raises(AdapterNotFoundError) as info:
        resolver.resolve("only-local", source="hub")
    assert "adapter roots" not in str(info.value)


@pytest.mark.parametrize("source", ["s3", "pbase", "", "LOCAL"])
def test_unknown_source_is_refused_by_name(make, hub, source):
    with pytest.raises(AdapterRefusedError) as info:
        make().resolve("org/name", source=source)
    assert str(info.value) == (
        f"adapter 'org/name': unknown adapter_source {source!r}; expected 'local' or 'hub' (or none)"
    )
    assert hub.calls == []


def test_revision_with_source_local_is_refused(make):
    with pytest.raises(AdapterRefusedError, match="a revision applies only to Hub adapters"):
        make().resolve("org/name@v1", source="local")


def test_revision_skips_the_roots(tree, make):
    write_adapter(tree["r1"] / "org" / "name")
    cache_repo(tree["hf-cache"], "org/name", SHA_V1, refs=("v1",))
    assert make().resolve("org/name@v1").kind == "hf-cache"


# Escapes: refused before anything outside a root is opened.

ESCAPES = [
    ("..", "a '..' component"),
    ("../x", "a '..' component"),
    ("a/../../etc", "a '..' component"),
    ("../outside/adapter", "a '..' component"),
    ("/etc/passwd", "an absolute path"),
    ("%2e%2e/x", "contains '%'"),
    ("a%2fb", "contains '%'"),
    ("%41", "contains '%'"),
    ("a\\b", "a backslash"),
    ("..\\outside", "a backslash"),
    ("a/b/c", "more than 2 components"),
    ("a/b/c@v1", "more than 2 components"),
    (".hidden", "starts with '.'"),
    ("org/.hidden", "starts with '.'"),
    ("./x", "starts with '.'"),
    ("a\x00b", "a NUL character"),
    ("", "the id is empty"),
    ("a//b", "an empty component"),
    ("org/", "an empty component"),
    ("/", "an absolute path"),
    ("~/x", "characters other than"),
    ("a b", "characters other than"),
    ("nåme", "characters other than"),
    ("a" * 97, "longer than 96 characters"),
    ("a--b", "Hugging Face repo-id rules"),
    ("name.git", "Hugging Face repo-id rules"),
    ("org/name@", "the revision after '@' is empty"),
    ("org/name@../../x", "not a branch, tag or commit name"),
    ("org/name@a@b", "not a branch, tag or commit name"),
    ("org/name@.hidden", "not a branch, tag or commit name"),
]


@pytest.mark.parametrize("source", [None, "local", "hub"])
@pytest.mark.parametrize(("adapter_id", "reason"), ESCAPES, ids=[repr(e[0])[:30] for e in ESCAPES])
def test_escape_attempt_is_refused(tree, make, hub, no_outside_access, adapter_id, reason, source):
    with no_outside_access(), pytest.raises(AdapterRefusedError) as info:
        make(allow_download=True).resolve(adapter_id, source=source)
    assert str(info.value).startswith(f"adapter {adapter_id!r} refused: ")
    assert reason in str(info.value)
    assert hub.calls == []


@pytest.mark.parametrize("link", ["evil", "org/evil", "org"])
def test_symlinked_directory_leading_outside_is_refused(tree, make, no_outside_access, link):
    (tree["r1"] / link).parent.mkdir(parents=True, exist_ok=True)
    (tree["r1"] / link).symlink_to(tree["outside"] if link == "org" else tree["outside"] / "adapter")
    adapter_id = "org/adapter" if link == "org" else link
    with no_outside_access(), pytest.raises(AdapterRefusedError) as info:
        make().resolve(adapter_id)
    assert f"a symbolic link leads it outside adapter root {str(tree['r1'])!r}" in str(info.value)
    assert str(tree["outside"]) not in str(info.value)


def test_dangling_symlink_leading_outside_is_refused(tree, make, no_outside_access):
    (tree["r1"] / "dangling").symlink_to(tree["outside"] / "not-there")
    with no_outside_access(), pytest.raises(AdapterRefusedError):
        make().resolve("dangling")


@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_symlinked_adapter_file_leading_outside_is_refused(tree, make, no_outside_access, name):
    directory = write_adapter(tree["r1"] / "sneaky")
    (directory / name).unlink()
    (directory / name).symlink_to(tree["outside"] / "adapter" / name)
    outside_link = f"its {name} is a symbolic link leading outside adapter root"
    with no_outside_access(), pytest.raises(AdapterRefusedError, match=outside_link):
        make().resolve("sneaky")


def test_symlinks_within_the_root_are_followed(tree, make):
    target = write_adapter(tree["r1"] / "store" / "real")
    (tree["r1"] / "alias").symlink_to(target)
    weights = write_adapter(tree["r1"] / "linked-files", ("adapter_config.json",))
    (weights / "adapter_model.safetensors").symlink_to(target / "adapter_model.safetensors")
    resolver = make()
    assert resolver.resolve("alias").path == target.resolve()
    assert resolver.resolve("linked-files").path == weights.resolve()


# resolve_path: vLLM's lora_path.


def test_resolve_path_relative_is_an_id(tree, make):
    write_adapter(tree["r2"] / "org" / "name")
    got = make().resolve_path("org/name")
    assert (got.kind, got.path) == ("root", (tree["r2"] / "org" / "name").resolve())


@pytest.mark.parametrize("suffix", ["", "/"])
def test_resolve_path_absolute_inside_a_root(tree, make, suffix):
    write_adapter(tree["r2"] / "org" / "name")
    lora_path = f"{tree['r2']}/org/name{suffix}"
    got = make().resolve_path(lora_path)
    assert (got.id, got.kind, got.path) == (lora_path, "root", (tree["r2"] / "org" / "name").resolve())


def test_resolve_path_through_a_symlinked_root(tree, tmp_path):
    write_adapter(tree["r1"] / "name")
    (tmp_path / "root-link").symlink_to(tree["r1"])
    resolver = AdapterResolver([tmp_path / "root-link"], tree["hf-cache"], False)
    assert resolver.resolve_path(f"{tmp_path}/root-link/name").path == (tree["r1"] / "name").resolve()
    assert resolver.resolve("name").path == (tree["r1"] / "name").resolve()


def test_resolve_path_hub_id_uses_the_cache(tree, make):
    cache_repo(tree["hf-cache"], "org/name", SHA_MAIN)
    cache_repo(tree["hf-cache"], "org/name", SHA_V1, refs=("v1",))
    assert make().resolve_path("org/name@v1").revision == SHA_V1


def test_resolve_path_missing_directory_in_a_root_is_not_found(tree, make):
    with pytest.raises(AdapterNotFoundError, match="has no adapter_config.json or adapter_model.safetensors"):
        make().resolve_path(f"{tree['r1']}/absent")


ABSOLUTE_ESCAPES = [
    ("{outside}/adapter", "not inside an adapter root"),
    ("/etc/passwd", "not inside an adapter root"),
    ("{r1}/../outside/adapter", "empty, '.' or '..' component"),
    ("{r1}/./x", "empty, '.' or '..' component"),
    ("{r1}//x", "empty, '.' or '..' component"),
    ("{r1}", "not inside an adapter root"),
    ("{r1}/a/b/c", "more than 2 components"),
    ("{r1}/.hidden", "starts with '.'"),
    ("{r1}/a%2fb", "contains '%'"),
    ("{r1}/%2e%2e/outside", "contains '%'"),
    ("{r1}/a\\b", "a backslash"),
    ("{r1}/a\x00b", "a NUL character"),
    ("{r1}/evil", "not inside an adapter root"),
]


@pytest.mark.parametrize(("template", "reason"), ABSOLUTE_ESCAPES, ids=[e[0][:30] for e in ABSOLUTE_ESCAPES])
def test_resolve_path_escape_attempt_is_refused(tree, make, hub, no_outside_access, template, reason):
    (tree["r1"] / "evil").symlink_to(tree["outside"] / "adapter")
    lora_path = template.format(r1=tree["r1"], outside=tree["outside"])
    with no_outside_access(), pytest.raises(AdapterRefusedError) as info:
        make(allow_download=True).resolve_path(lora_path)
    assert reason in str(info.value)
    assert str(info.value).startswith("lora_path ")
    assert hub.calls == []


def test_every_error_shares_the_base_class_and_names_the_adapter(make):
    for call in (lambda r: r.resolve("absent"), lambda r: r.resolve("../x"), lambda r: r.resolve("x", "s3")):
        with pytest.raises(AdapterResolveError) as info:
            call(make())
        assert info.value.adapter_id in str(info.value)
