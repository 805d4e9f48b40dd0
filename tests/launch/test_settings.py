"""Settings: names (CLI flags, TGI's environment variables), defaults, validation, the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.dtype import auto_dtype
from launch.model_source import DEFAULT_MODEL_ID
from launch.settings import Settings, SettingsError, env_name, load_settings, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults():
    s = load_settings([])
    assert s.model_id == DEFAULT_MODEL_ID
    assert (s.num_shard, s.port, s.hostname, s.block_size) == (1, 3000, "0.0.0.0", 16)
    assert s.graceful_termination_timeout == 90.0
    assert s.lora_adapters == "" and s.max_lora_rank is None and s.max_lora_adapters is None
    assert (s.lora_adapter_roots, s.adapter_roots, s.adapter_download) == ("", [], False)
    assert s.hf_cache_dir() is None
    assert s.multilora_cache == Path("~/.cache/multilora")
    # auto: per machine (tests/launch/test_dtype.py drives both CPU branches)
    assert s.dtype is None and s.resolved_dtype("cpu") == auto_dtype("cpu").dtype
    assert s.resolved_kv_cache_bytes("cpu") == 1 << 30
    # CUDA: none given, so each rank plans it from its device (tests/worker/test_memory_plan.py)
    assert s.resolved_kv_cache_bytes("cuda") is None and s.cuda_memory_fraction == 0.9
    assert load_settings(["--kv-cache-memory", "2GiB"]).resolved_kv_cache_bytes("cuda") == 2 << 30


def test_env_and_cli_names(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "/models/x")
    monkeypatch.setenv("NUM_SHARD", "2")
    monkeypatch.setenv("LORA_ADAPTERS", "a=/p")
    monkeypatch.setenv("KV_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("DTYPE", "float32")
    monkeypatch.setenv("MAX_BATCH_SIZE", "auto")
    s = load_settings(["--num-shard", "3", "--port", "8080", "--max-lora-rank", "16"])
    assert s.model_id == "/models/x"
    assert s.num_shard == 3  # the flag wins over the environment
    assert (s.port, s.max_lora_rank, s.lora_adapters, s.dtype) == (8080, 16, "a=/p", "float32")
    assert s.kv_cache_memory == 2 << 30
    assert s.resolved_dtype("cpu") == "float32"  # a set DTYPE is used as it is
    assert s.max_batch_size is None


@pytest.mark.parametrize(
    "env, argv, named",
    [
        ({"NUM_SHARD": "0"}, [], "NUM_SHARD (--num-shard)"),
        ({}, ["--port", "70000"], "PORT (--port)"),
        ({"DTYPE": "fp8"}, [], "DTYPE (--dtype)"),
        ({"KV_CACHE_MEMORY": "lots"}, [], "KV_CACHE_MEMORY (--kv-cache-memory)"),
        ({"MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "100"}, [], "MAX_INPUT_TOKENS (100) must be less"),
    ],
)
def test_validation_errors_name_the_setting(monkeypatch, env, argv, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings(argv)


def test_adapter_roots_and_download(monkeypatch, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_ADAPTER_ROOTS", "one, two")
    monkeypatch.setenv("ADAPTER_DOWNLOAD", "true")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "hub")
    s = load_settings([])
    # Stored absolute, in order (the first root holding an adapter wins).
    assert s.adapter_roots == [str(tmp_path / "one"), str(tmp_path / "two")]
    assert s.adapter_download is True and s.hf_cache_dir() == tmp_path / "hub"
    s = load_settings(["--lora-adapter-roots", str(tmp_path / "two"), "--adapter-download", "false"])
    assert (s.adapter_roots, s.adapter_download) == ([str(tmp_path / "two")], False)


@pytest.mark.parametrize(
    "roots, named",
    [
        ("{tmp}/missing", "adapter root '{tmp}/missing' ({tmp}/missing) does not exist"),
        ("{tmp}/file", "adapter root '{tmp}/file' ({tmp}/file) is not a directory"),
        ("{tmp},", "entry 2 is empty"),
    ],
)
def test_adapter_roots_must_be_directories(monkeypatch, tmp_path, roots, named):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LORA_ADAPTER_ROOTS", roots.format(tmp=tmp_path))
    with pytest.raises(SettingsError, match=re.escape("LORA_ADAPTER_ROOTS (--lora-adapter-roots): ")) as err:
        load_settings([])
    assert named.format(tmp=tmp_path) in str(err.value)


def test_readme_settings_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, (
        "README.md's settings table is stale; regenerate it with "
        "`python -c 'from launch.settings import settings_table; print(settings_table())'`"
    )


def test_e2e_harness_clears_every_setting_but_the_caches():
    from tests.e2e.harness import _LAUNCHER_ENV, INHERITED_ENV

    assert {env_name(name) for name in Settings.model_fields} == _LAUNCHER_ENV | INHERITED_ENV
