"""Resolve an adapter id that is not loaded to a local PEFT adapter directory (issue 15).

Order, after the registry's own "already loaded" check:
1. the adapter roots (`LORA_ADAPTER_ROOTS`): `<root>/<name>` or `<root>/<org>/<name>`; the first root
   holding the directory wins;
2. the local Hugging Face cache, as huggingface_hub resolves `org/name` and `org/name@revision` (branch,
   tag or commit sha), with no network call;
3. a Hub download of the adapter files alone, only when downloading is allowed (`ADAPTER_DOWNLOAD=true`):
   otherwise any client could make the server download any repo.
lorax-client's `adapter_source` narrows the search: "local" is step 1, "hub" steps 2 and 3.

Security rule: ids and `lora_path`s come from clients, so their syntax is checked first (Hugging Face
repo-id characters, `name` or `org/name`, no `..`, `%`, backslash, NUL, hidden or empty component, absolute
path), and the real path (symlinks followed) of every candidate directory and of both adapter files must lie
inside the root (in the cache: inside the repo's cache folder) before anything there is opened. Until then
only stat and readlink calls are made.

The API is synchronous and blocks on file and network I/O: the registry calls it through asyncio.to_thread.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

# What a PEFT adapter directory must hold; also the only files a download fetches.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SOURCES = ("local", "hub")
DOWNLOAD_HINT = "download disabled: set ADAPTER_DOWNLOAD=true to allow it"
MAX_ID_LENGTH = 96  # huggingface_hub's limit for a repo id
MAX_REVISION_LENGTH = 128
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_UNSAFE_CHARACTERS = (
    ("\x00", "it contains a NUL character"),
    ("%", "it contains '%' (percent-encoded characters are not decoded)"),
    ("\\", "it contains a backslash"),
)

Kind = Literal["root", "hf-cache", "hub-download"]


class AdapterResolveError(Exception):
    """An adapter id or path that did not resolve; the message names it, `adapter_id` holds it."""

    def __init__(self, adapter_id: str, message: str):
        super().__init__(message)
        self.adapter_id = adapter_id


class AdapterNotFoundError(AdapterResolveError):
    """The id resolves nowhere, or its directory lacks an adapter file."""


class AdapterRefusedError(AdapterResolveError):
    """The id is malformed, names an unknown source, or leads outside a root."""


class AdapterDownloadError(AdapterResolveError):
    """The Hub could not be reached or refused the download."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """A PEFT adapter directory; `revision` is the commit sha for the cache and the Hub, else None."""

    id: str
    path: Path
    kind: Kind
    revision: str | None


@dataclass(frozen=True)
class _ParsedId:
    repo_id: str
    revision: str | None


def _show(text: str) -> str:
    return repr(text if len(text) <= 100 else text[:100] + "...")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _unsafe_character(text: str) -> str | None:
    """Why `text` holds a character no id or path may hold, or None; `%` is refused, never decoded."""
    for bad, reason in _UNSAFE_CHARACTERS:
        if bad in text:
            return reason
    return None


def _name_error(name: str) -> str | None:
    """Why `name` (`name` or `org/name`) is not a safe id, or None."""
    parts = name.split("/")
    if ".." in parts:
        return "it contains a '..' component"
    if "" in parts:
        return "it has an empty component"
    if any(part.startswith(".") for part in parts):
        return "a component starts with '.'"
    if len(parts) > 2:
        return "it has more than 2 components (expected `name` or `org/name`)"
    if not all(_COMPONENT_RE.fullmatch(part) for part in parts):
        return "it has characters other than letters, digits, '.', '_' and '-'"
    if len(name) > MAX_ID_LENGTH:
        return f"it is longer than {MAX_ID_LENGTH} characters"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return (
            "it breaks the Hugging Face repo-id rules (no '--', '..', '.git' suffix, '-' or '.' at the end)"
        )
    return None


def _syntax_error(adapter_id: str) -> str | None:
    """Why `adapter_id` (`name`, `org/name`, optionally `@revision`) is refused, or None."""
    if not adapter_id:
        return "the id is empty"
    reason = _unsafe_character(adapter_id)
    if reason is not None:
        return reason
    if adapter_id.startswith("/"):
        return "it is an absolute path"
    name, at, revision = adapter_id.partition("@")
    if at and not revision:
        return "the revision after '@' is empty"
    # Branch names may hold '/' (`refs/pr/1`); each component is checked, so none can climb.
    if at and (
        len(revision) > MAX_REVISION_LENGTH
        or not all(_COMPONENT_RE.fullmatch(part) for part in revision.split("/"))
    ):
        return "the revision is not a branch, tag or commit name"
    return _name_error(name)


def _parse(adapter_id: str) -> _ParsedId:
    reason = _syntax_error(adapter_id)
    if reason is not None:
        raise AdapterRefusedError(adapter_id, f"adapter {_show(adapter_id)} refused: {reason}")
    name, _, revision = adapter_id.partition("@")
    return _ParsedId(name, revision or None)


class AdapterResolver:
    """Finds adapter directories under `roots`, in the HF cache, then (if allowed) on the Hub.

    `roots` are LORA_ADAPTER_ROOTS as configured; `hf_cache_dir` is the hub cache (None: huggingface_hub's
    default); `allow_download` is ADAPTER_DOWNLOAD.
    """

    def __init__(self, roots: Sequence[Path], hf_cache_dir: Path | None, allow_download: bool):
        self.roots = tuple(Path(root) for root in roots)
        self.hf_cache_dir = hf_cache_dir
        self.allow_download = allow_download

    def resolve(self, adapter_id: str, source: str | None = None) -> ResolvedAdapter:
        """Resolve `adapter_id` (`name`, `org/name`, `org/name@revision`) to a PEFT adapter directory.

        `source` is lorax-client's `adapter_source`: "local" (roots only), "hub" (cache, then download) or
        None (all in order). Raises an `AdapterResolveError` subclass naming the id.
        """
        if source is not None and source not in SOURCES:
            raise AdapterRefusedError(
                adapter_id,
                f"adapter {_show(adapter_id)}: unknown adapter_source {_show(str(source))}; "
                "expected 'local' or 'hub' (or none)",
            )
        parsed = _parse(adapter_id)
        looked: list[str] = []
        if source in (None, "local"):
            if parsed.revision is not None:
                if source == "local":
                    raise AdapterRefusedError(
                        adapter_id,
                        f"adapter {_show(adapter_id)} refused: a revision applies only to Hub adapters, "
                        "not to adapter_source 'local'",
                    )
                looked.append("adapter roots skipped (a revision applies only to the Hub)")
            else:
                found = self._from_roots(adapter_id, parsed.repo_id.split("/"))
                if found is not None:
                    return found
                looked.append(self._roots_note())
        if source == "local":
            raise self._not_found(adapter_id, looked)
        return self._from_hub(adapter_id, parsed, looked)

    def resolve_path(self, lora_path: str) -> ResolvedAdapter:
        """Resolve vLLM's `lora_path`: a directory inside a root or a Hub repo id.

        A relative path is an id (`name` or `org/name` under a root, else a Hub repo as in `resolve`); an
        absolute one must have its real path `<root>/name` or `<root>/org/name` for some root.
        """
        if not lora_path.startswith("/"):
            return self.resolve(lora_path)
        shown = _show(lora_path)
        components = lora_path.removesuffix("/").split("/")[1:]
        reason = _unsafe_character(lora_path)
        if reason is not None:
            raise AdapterRefusedError(lora_path, f"lora_path {shown} refused: {reason}")
        if any(part in ("", ".", "..") for part in components):
            raise AdapterRefusedError(
                lora_path, f"lora_path {shown} refused: it has an empty, '.' or '..' component"
            )
        real = os.path.realpath(lora_path)
        for root in self.roots:
            root_real = os.path.realpath(root)
            if real == root_real or not _inside(real, root_real):
                continue
            relative = os.path.relpath(real, root_real)
            reason = _name_error(relative)
            if reason is not None:
                raise AdapterRefusedError(
                    lora_path, f"lora_path {shown} refused: inside adapter root {str(root)!r}, {reason}"
                )
            return self._adapter_dir(lora_path, real, root_real, f"adapter root {str(root)!r}", "root")
        raise AdapterRefusedError(
            lora_path, f"lora_path {shown} refused: it is not inside an adapter root ({self._roots_note()})"
        )

    def _roots_note(self) -> str:
        if not self.roots:
            return "no adapter roots configured (LORA_ADAPTER_ROOTS)"
        return "adapter roots " + ", ".join(repr(str(root)) for root in self.roots)

    def _not_found(self, adapter_id: str, looked: list[str]) -> AdapterNotFoundError:
        return AdapterNotFoundError(
            adapter_id, f"adapter {_show(adapter_id)} not found; looked in: " + "; ".join(looked)
        )

    def _from_roots(self, adapter_id: str, parts: list[str]) -> ResolvedAdapter | None:
        for root in self.roots:
            root_real = os.path.realpath(root)
            candidate = os.path.realpath(os.path.join(root_real, *parts))
            if not _inside(candidate, root_real):
                raise AdapterRefusedError(
                    adapter_id,
                    f"adapter {_show(adapter_id)} refused: a symbolic link leads it outside "
                    f"adapter root {str(root)!r}",
                )
            if os.path.isdir(candidate):
                return self._adapter_dir(
                    adapter_id, candidate, root_real, f"adapter root {str(root)!r}", "root"
                )
        return None

    def _adapter_dir(
        self,
        adapter_id: str,
        directory: str,
        boundary: str,
        where: str,
        kind: Kind,
        revision: str | None = None,
    ) -> ResolvedAdapter:
        """`directory` as a ResolvedAdapter once both adapter files are real files inside `boundary`."""
        missing = []
        for name in ADAPTER_FILES:
            real = os.path.realpath(os.path.join(directory, name))
            if not _inside(real, boundary):
                raise AdapterRefusedError(
                    adapter_id,
                    f"adapter {_show(adapter_id)} refused: "
                    f"its {name} is a symbolic link leading outside {where}",
                )
            if not os.path.isfile(real):
                missing.append(name)
        if missing:
            raise AdapterNotFoundError(
                adapter_id,
                f"adapter {_show(adapter_id)}: its directory in {where} has no {' or '.join(missing)} "
                f"(a PEFT adapter needs {' and '.join(ADAPTER_FILES)})",
            )
        return ResolvedAdapter(adapter_id, Path(directory), kind, revision)

    def _storage(self, repo_id: str) -> str:
        """The real path of the repo's cache folder (`models--org--name`), as huggingface_hub names it."""
        cache = Path(self.hf_cache_dir if self.hf_cache_dir is not None else constants.HF_HUB_CACHE)
        return os.path.realpath(cache.expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model"))

    def _cached_commit(self, adapter_id: str, storage: str, revision: str | None) -> str | None:
        """The commit sha `revision` names in the cache, or None; the refs file is checked before reading.

        This is huggingface_hub's lookup (a sha as is, else `refs/<revision>`), done here so that a
        malformed refs file cannot steer snapshot_download to paths outside the repo folder.
        """
        revision = revision or constants.DEFAULT_REVISION
        if _COMMIT_RE.fullmatch(revision):
            return revision
        ref = os.path.realpath(os.path.join(storage, "refs", revision))
        if not _inside(ref, storage) or not os.path.isfile(ref):
            return None
        with open(ref) as fh:
            commit = fh.read().strip()
        if not _COMMIT_RE.fullmatch(commit):
            raise AdapterRefusedError(
                adapter_id, f"adapter {_show(adapter_id)} refused: its cached ref is not a commit sha"
            )
        return commit

    def _from_hub(self, adapter_id: str, parsed: _ParsedId, looked: list[str]) -> ResolvedAdapter:
        at = f" at revision {parsed.revision!r}" if parsed.revision else ""
        storage = self._storage(parsed.repo_id)
        commit = self._cached_commit(adapter_id, storage, parsed.revision)
        if commit is not None:
            try:
                path = snapshot_download(
                    parsed.repo_id,
                    revision=commit,
                    cache_dir=self.hf_cache_dir,
                    allow_patterns=list(ADAPTER_FILES),
                    local_files_only=True,  # never the network here: LoRAX #430 did a Hub lookup per request
                )
            except LocalEntryNotFoundError:  # absent, or incomplete by the cached tree listing
                pass
            else:
                try:
                    return self._snapshot(adapter_id, path, storage, "hf-cache")
                except AdapterNotFoundError:
                    if not self.allow_download:
                        raise
                    # An interrupted download: fetching the adapter files again completes it.
        looked.append(f"the Hugging Face cache{at}")
        if not self.allow_download:
            looked.append(f"the Hub ({DOWNLOAD_HINT})")
            raise self._not_found(adapter_id, looked)
        return self._download(adapter_id, parsed, storage, looked)

    def _snapshot(self, adapter_id: str, path: str, storage: str, kind: Kind) -> ResolvedAdapter:
        real = os.path.realpath(path)
        commit = os.path.basename(real)
        if not _inside(real, storage) or not _COMMIT_RE.fullmatch(commit):
            raise AdapterRefusedError(
                adapter_id, f"adapter {_show(adapter_id)} refused: its snapshot lies outside its cache folder"
            )
        # Snapshot files are symlinks into the repo's blobs/, so the repo folder is the boundary.
        return self._adapter_dir(adapter_id, real, storage, "the Hugging Face cache", kind, commit)

    def _download(
        self, adapter_id: str, parsed: _ParsedId, storage: str, looked: list[str]
    ) -> ResolvedAdapter:
        shown = _show(adapter_id)
        logger.info("downloading adapter %s from the Hugging Face Hub", shown)
        try:
            path = snapshot_download(
                parsed.repo_id,
                revision=parsed.revision,
                cache_dir=self.hf_cache_dir,
                allow_patterns=list(ADAPTER_FILES),
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            if isinstance(exc, GatedRepoError):
                raise AdapterDownloadError(adapter_id, f"adapter {shown}: the Hub repo is gated") from exc
            looked.append(f"the Hub ({type(exc).__name__})")
            raise self._not_found(adapter_id, looked) from exc
        except Exception as exc:  # any other failure means the same to the client; the cause stays chained
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise AdapterDownloadError(
                adapter_id,
                f"adapter {shown}: download from the Hugging Face Hub failed "
                f"({type(exc).__name__}: {reason})",
            ) from exc
        return self._snapshot(adapter_id, path, storage, "hub-download")
