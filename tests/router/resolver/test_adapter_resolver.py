"""AdapterResolver: roots, the HF cache, Hub downloads and adapter_source (escape attempts: the
_escapes module). No test reaches the network (tests/router/resolver/harness.py).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from router.adapter_resolver import (
    ADAPTER_FILES,
    AdapterDownloadError,
    AdapterNotFoundError,
    AdapterRefusedError,
    AdapterResolveError,
)
from tests.router.resolver.harness import (
    SHA_DOWNLOADED,
    SHA_MAIN,
    SHA_V1,
    cache_repo,
    fake_download,
    write_adapter,
)


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


def test_every_error_shares_the_base_class_and_names_the_adapter(make):
    for call in (lambda r: r.resolve("absent"), lambda r: r.resolve("../x"), lambda r: r.resolve("x", "s3")):
        with pytest.raises(AdapterResolveError) as info:
            call(make())
        assert info.value.adapter_id in str(info.value)
