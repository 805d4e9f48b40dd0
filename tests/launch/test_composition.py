"""Config composition: the values shared by both sides written into each WorkerConfig and the RouterConfig,
the LoRA rank and slot limits, and the workers' private socket directory."""

from __future__ import annotations

import logging
import shutil
import stat

import pytest

from launch.adapters import AdapterSpec, ResolvedAdapter
from launch.composition import compose, make_uds_paths, prepare
from launch.dtype import auto_dtype
from launch.settings import SettingsError, load_settings
from router.config import RouterConfig
from worker.config import WorkerConfig


def _resolved(tmp_path, lora_ranks):
    return [
        ResolvedAdapter(AdapterSpec(f"a{i}=/x", f"a{i}", f"/src/a{i}", None), tmp_path / f"a{i}", r)
        for i, r in enumerate(lora_ranks)
    ]


def test_compose_writes_shared_values_into_both(tmp_path):
    s = load_settings(
        ["--num-shard", "2", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--port", "1234"]
    )
    workers, router = compose(s, tmp_path, _resolved(tmp_path, [4, 16]), ["/s/0", "/s/1"], "cpu")
    assert [w.rank for w in workers] == [0, 1]
    for w in workers:
        assert (w.world_size, w.dtype, w.device, w.model_dir) == (2, "float32", "cpu", tmp_path)
        assert (w.max_lora_rank, w.max_adapters, w.kv_cache_bytes, w.block_size) == (256, 1026, 64 << 20, 16)
        assert (w.adapter_memory_bytes, w.adapter_host_memory_bytes) == (1 << 30, 1 << 30)
        assert WorkerConfig.from_json(w.to_json()) == w
    assert router.worker_uds == ["/s/0", "/s/1"]
    assert [(a.id, a.source, a.path) for a in router.adapters] == [
        ("a0", "/src/a0", str(tmp_path / "a0")),
        ("a1", "/src/a1", str(tmp_path / "a1")),
    ]
    assert (router.port, router.model_dir, router.shutdown_timeout_s) == (1234, str(tmp_path), 90.0)
    assert (router.api_key, router.payload_limit, router.grpc_port) == (None, 2_000_000, None)
    assert (router.adapter_roots, router.adapter_download, router.hf_cache_dir) == ([], False, None)
    cuda, _ = compose(load_settings(["--cuda-memory-fraction", "0.8"]), tmp_path, [], ["/s"], "cuda")
    assert (cuda[0].kv_cache_bytes, cuda[0].memory_fraction, cuda[0].profile_tokens) == (None, 0.8, 4096)
    _, router = compose(load_settings(["--api-key", "k", "--grpc-port", "0"]), tmp_path, [], ["/s"], "cpu")
    assert (router.api_key, router.grpc_port) == ("k", 0)
    assert RouterConfig.model_validate_json(router.model_dump_json()) == router


def test_compose_lora_rank_and_slot_limits(tmp_path):
    adapters = _resolved(tmp_path, [8, 32])
    workers, _ = compose(
        load_settings(["--max-lora-rank", "64", "--max-lora-adapters", "5"]),
        tmp_path,
        adapters,
        ["/s"],
        "cpu",
    )
    assert (workers[0].max_lora_rank, workers[0].max_adapters) == (64, 5)
    with pytest.raises(
        SettingsError, match=r"MAX_LORA_RANK \(16\) is below the LoRA rank 32 of adapter 'a1'"
    ):
        compose(load_settings(["--max-lora-rank", "16"]), tmp_path, adapters, ["/s"], "cpu")
    with pytest.raises(SettingsError, match=r"MAX_LORA_ADAPTERS \(1\) is below the number of LORA_ADAPTERS"):
        compose(load_settings(["--max-lora-adapters", "1"]), tmp_path, adapters, ["/s"], "cpu")
    # auto: the LORA_ADAPTERS plus 1024 slots for runtime loads; a rank cap of 256, or the largest above.
    workers, router = compose(load_settings([]), tmp_path, [], ["/s"], "cpu")
    assert (workers[0].max_adapters, workers[0].max_lora_rank, router.adapters) == (1024, 256, [])
    workers, _ = compose(load_settings([]), tmp_path, _resolved(tmp_path, [8, 320]), ["/s"], "cpu")
    assert (workers[0].max_adapters, workers[0].max_lora_rank) == (1026, 320)
    # The adapter tiers' budgets: auto per device, or as set (0 turns the host tier off).
    workers, _ = compose(load_settings([]), tmp_path, [], ["/s"], "cuda")
    assert (workers[0].adapter_memory_bytes, workers[0].adapter_host_memory_bytes) == (4 << 30, 4 << 30)
    settings = load_settings(["--adapter-memory", "64MiB", "--adapter-host-memory", "0"])
    workers, _ = compose(settings, tmp_path, [], ["/s"], "cpu")
    assert (workers[0].adapter_memory_bytes, workers[0].adapter_host_memory_bytes) == (64 << 20, 0)
    # The adapter reader's priority: SCHED_IDLE by default, or a nice value.
    assert workers[0].adapter_load_nice is None
    workers, _ = compose(load_settings(["--adapter-load-priority", "10"]), tmp_path, [], ["/s"], "cpu")
    assert workers[0].adapter_load_nice == 10
    with pytest.raises(SettingsError, match="ADAPTER_LOAD_PRIORITY .* less than or equal to 19"):
        load_settings(["--adapter-load-priority", "20"])
    workers, _ = compose(load_settings(["--max-lora-adapters", "0"]), tmp_path, [], ["/s"], "cpu")
    assert workers[0].max_adapters == 0  # LoRA off


def test_compose_passes_adapter_lookup_to_the_router(tmp_path, monkeypatch):
    roots = [tmp_path / "r1", tmp_path / "r2"]
    for root in roots:
        root.mkdir()
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"))
    settings = load_settings(
        ["--lora-adapter-roots", ",".join(map(str, roots)), "--adapter-download", "true"]
    )
    _, router = compose(settings, tmp_path, [], ["/s"], "cpu")
    assert router.adapter_roots == [str(root) for root in roots]
    assert (router.adapter_download, router.hf_cache_dir) == (True, str(tmp_path / "hub"))
    assert RouterConfig.model_validate_json(router.model_dump_json()) == router


def test_uds_paths_are_private(tmp_path):
    directory, paths = make_uds_paths(tmp_path / "srv" / "shard", 2)
    assert directory.parent == tmp_path / "srv" and directory.name.startswith("shard-")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert paths == [str(directory / "shard-0"), str(directory / "shard-1")]
    directory, paths = make_uds_paths(None, 1)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and len(paths) == 1
    directory.rmdir()
    with pytest.raises(SettingsError, match="SHARD_UDS_PATH"):
        make_uds_paths(tmp_path / ("x" * 120), 1)


def test_prepare_logs_what_dtype_auto_chose_once(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # float32 on any CPU (tests/launch/test_dtype.py)
    caplog.set_level(logging.INFO, logger="launcher")
    workers, router, uds_dir = prepare(load_settings(["--model-id", str(tiny_model_dir), "--device", "cpu"]))
    shutil.rmtree(uds_dir)
    assert {w.dtype for w in workers} == {"float32"}
    assert caplog.text.count("DTYPE auto") == 1
    assert f"DTYPE auto: float32 ({auto_dtype('cpu').reason})" in caplog.text
    caplog.clear()
    workers, router, uds_dir = prepare(
        load_settings(["--model-id", str(tiny_model_dir), "--device", "cpu", "--dtype", "bfloat16"])
    )
    shutil.rmtree(uds_dir)
    assert workers[0].dtype == "bfloat16" and "DTYPE auto" not in caplog.text


def test_prepare_refuses_a_num_shard_the_heads_cannot_take(tiny_model_dir):
    # The tiny model has 8 attention heads and 4 KV heads: 8 ranks hold each KV head twice; 3 and 16 fail.
    for num_shard, message in [
        (3, "8 attention heads do not divide across 3"),
        (16, "8 attention heads do not divide across 16"),
    ]:
        with pytest.raises(SettingsError, match=rf"NUM_SHARD \({num_shard}\): {message}"):
            prepare(load_settings(["--model-id", str(tiny_model_dir), "--num-shard", str(num_shard)]))
    workers, _, uds_dir = prepare(
        load_settings(["--model-id", str(tiny_model_dir), "--device", "cpu", "--num-shard", "8"])
    )
    shutil.rmtree(uds_dir)
    assert [w.rank for w in workers] == list(range(8))
