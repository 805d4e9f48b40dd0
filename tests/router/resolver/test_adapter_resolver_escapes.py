"""AdapterResolver refuses every escape from the roots before anything outside them is opened: the
`no_outside_access` guard (tests/router/resolver/harness.py) fails a test that opens or lists a file
outside the root while the call runs.
"""

from __future__ import annotations

import pytest

from router.adapter_resolver import (
    ADAPTER_FILES,
    AdapterNotFoundError,
    AdapterRefusedError,
    AdapterResolver,
)
from tests.router.resolver.harness import (
    SHA_MAIN,
    SHA_V1,
    cache_repo,
    write_adapter,
)

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
