"""The worker process: its command line, config JSON, lockstep ranks under SIGTERM, startup failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from tests.worker.engine_scenario import generation_of
from tests.worker.server_harness import (
    as_tuples,
    load_request,
    new_sequence,
    worker_config,
)
from worker import __main__ as worker_main
from worker.config import WorkerConfig
from worker.lora.adapter import load_peft_adapter
from worker.runner import ModelRunner, PrefillRequest
from worker.sampler import SamplingParams


def test_config_json_round_trip(tiny_model_dir):
    config = worker_config(tiny_model_dir, num_blocks=None, rank=1, world_size=2)
    assert WorkerConfig.from_json(config.to_json()) == config
    for bad, message in [
        ("{", "not valid JSON"),
        ('{"dtype": "float32"}', "needs model_dir"),
        ('{"model_dir": "/m", "block_sizes": 4}', "unknown worker config fields: block_sizes"),
        ('{"model_dir": "/m", "block_size": "4"}', "'block_size' must be int"),
        ('{"model_dir": "/m", "num_blocks": true}', "'num_blocks' must be int | None"),
    ]:
        with pytest.raises(ValueError, match=message):
            WorkerConfig.from_json(bad)


def start_worker(config: WorkerConfig, uds: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worker", "--config-json", config.to_json(), "--uds", str(uds)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def wait_healthy(uds: Path, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not uds.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the worker did not bind its socket"
        await asyncio.sleep(0.1)
    async with grpc.aio.insecure_channel(f"unix://{uds}") as channel:
        await pb_grpc.TextGenerationServiceStub(channel).Health(
            pb.HealthRequest(), wait_for_ready=True, timeout=10
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_cli_two_ranks_serve_in_lockstep_until_sigterm(tiny_model_dir, tiny_adapters, sock_dir):
    """`python -m worker` with TP=2: private sockets, every RPC to both ranks at once, rank 0 answering
    what one rank alone would, and a clean exit on SIGTERM."""
    config = replace(worker_config(tiny_model_dir), world_size=2, master_port=free_port())
    socks = [sock_dir / f"rank{r}.sock" for r in range(2)]
    procs = [start_worker(replace(config, rank=r), socks[r]) for r in range(2)]
    try:
        await asyncio.gather(*(wait_healthy(uds, p) for uds, p in zip(socks, procs, strict=True)))
        assert [stat.S_IMODE(os.stat(uds).st_mode) for uds in socks] == [0o600, 0o600]
        channels = [grpc.aio.insecure_channel(f"unix://{uds}") for uds in socks]
        stubs = [pb_grpc.TextGenerationServiceStub(c) for c in channels]
        assert [(await s.Info(pb.InfoRequest())).rank for s in stubs] == [0, 1]
        load = load_request(1, "r8_all", tiny_adapters)
        replies = await asyncio.gather(*(s.LoadAdapter(load) for s in stubs))
        # Each rank holds its share: the column-parallel modules' A is whole on both, B is split.
        assert 0 < replies[0].weight_bytes == replies[1].weight_bytes
        seqs = [new_sequence(1, [3, 4, 5, 6, 7], [0, 1]), new_sequence(2, [8, 9], [2, 3], slot=1)]
        steps = [pb.PrefillRequest(sequences=seqs)] + [pb.DecodeRequest(request_ids=[1, 2])] * 3
        served = []
        for step in steps:
            call = "Prefill" if isinstance(step, pb.PrefillRequest) else "Decode"
            replies = await asyncio.gather(*(getattr(s, call)(step) for s in stubs))
            assert as_tuples(replies[0].generations) == as_tuples(replies[1].generations)
            served.append([g.token_id for g in replies[0].generations])
        for c in channels:
            await c.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [(await asyncio.to_thread(p.communicate, timeout=30))[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    for rank, output in enumerate(outputs):
        assert f"[rank {rank}] worker: ready: serving on unix://" in output
    assert not any(uds.exists() for uds in socks)

    runner = ModelRunner(worker_config(tiny_model_dir))
    adapter = load_peft_adapter("r8_all", tiny_adapters["r8_all"], 3, runner.module_shapes())
    runner.load_adapter(1, adapter, generation_of(1))
    greedy = SamplingParams()
    direct = [
        runner.prefill(
            [
                PrefillRequest(1, [3, 4, 5, 6, 7], [0, 1], greedy),
                PrefillRequest(2, [8, 9], [2, 3], greedy, 1, adapter_generation=generation_of(1)),
            ]
        )
    ]
    direct += [runner.decode([1, 2]) for _ in range(3)]
    assert served == [[o.token_id for o in outs] for outs in direct]


@pytest.fixture
def unsupported_model_dir(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    return tmp_path


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad model dir", "cannot start: FileNotFoundError: model directory '/no/such/model' does not exist"),
        ("unsupported architecture", "model architecture GPT2LMHeadModel is not supported"),
        ("KV budget too small", "cannot start: ValueError: a KV budget of 16 bytes holds no block"),
        ("socket directory missing", "cannot serve: cannot bind the unix socket"),
    ],
)
def test_startup_error_exits_nonzero(case, message, tiny_model_dir, unsupported_model_dir, sock_dir, caplog):
    config, uds = worker_config(tiny_model_dir), sock_dir / "rank0.sock"
    if case == "bad model dir":
        config = replace(config, model_dir=Path("/no/such/model"))
    elif case == "unsupported architecture":
        config = replace(config, model_dir=unsupported_model_dir)
    elif case == "KV budget too small":
        config = replace(config, num_blocks=None, kv_cache_bytes=16)
    else:
        uds = sock_dir / "missing" / "rank0.sock"
    assert run_main(config.to_json(), uds) == 1
    assert any(message in r.getMessage() and r.levelname == "ERROR" for r in caplog.records), caplog.text


def test_bad_config_json_exits_2(sock_dir, caplog):
    assert run_main(json.dumps({"model_dir": "/m", "dtype": "int8"}), sock_dir / "x.sock") == 2
    assert "bad --config-json: dtype 'int8' is not one of" in caplog.text


def run_main(config_json: str, uds: Path) -> int:
    """`python -m worker` in this process, for the paths that end before serving."""
    with pytest.MonkeyPatch.context() as mp:
        # basicConfig(force=True) would take the root logger away from pytest's log capture.
        mp.setattr(worker_main, "setup_logging", lambda rank, level: None)
        return worker_main.main(["--config-json", config_json, "--uds", str(uds)])
