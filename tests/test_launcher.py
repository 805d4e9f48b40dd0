"""Launcher: settings, LORA_ADAPTERS, rank detection, config composition, and process supervision
(with dummy child processes; the real worker and router are exercised in tests/e2e/)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import launcher
from launcher import AdapterSpec, Settings, SettingsError, compose, load_settings, parse_lora_adapters
from router.config import RouterConfig
from worker.config import WorkerConfig
from worker.model_source import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Settings read the environment: start every test from none of the launcher's variables."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


# ---- settings ------------------------------------------------------------------------------------


def test_defaults():
    s = load_settings([])
    assert s.model_id == DEFAULT_MODEL_ID
    assert (s.num_shard, s.port, s.hostname, s.block_size) == (1, 3000, "0.0.0.0", 16)
    assert s.graceful_termination_timeout == 90.0
    assert s.lora_adapters == "" and s.max_lora_rank is None and s.max_lora_adapters is None
    assert s.multilora_cache == Path("~/.cache/multilora")
    assert s.resolved_dtype("cpu") == "bfloat16"
    assert s.resolved_kv_cache_bytes("cpu") == 1 << 30


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


def test_help_lists_every_setting_with_env_and_default():
    out = subprocess.run(
        [sys.executable, "launcher.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"[env: {name.upper()}]" in text
    assert f"(default: {DEFAULT_MODEL_ID})" in text
    assert "(default: 90.0)" in text


def test_readme_settings_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert launcher.settings_table() in readme, (
        "README.md's settings table is stale; regenerate it with "
        "`python -c 'import launcher; print(launcher.settings_table())'`"
    )


# ---- LORA_ADAPTERS -------------------------------------------------------------------------------


def test_parse_lora_adapters_forms():
    specs = parse_lora_adapters(" org/a , org/b@v1.0,name=/local/dir, other=org/c@main,rel=demo/x ")
    assert specs == [
        AdapterSpec("org/a", "org/a", "org/a", None),
        AdapterSpec("org/b@v1.0", "org/b", "org/b", "v1.0"),
        AdapterSpec("name=/local/dir", "name", "/local/dir", None),
        AdapterSpec("other=org/c@main", "other", "org/c", "main"),
        AdapterSpec("rel=demo/x", "rel", "demo/x", None),
    ]
    assert parse_lora_adapters("") == [] and parse_lora_adapters("  ") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("a=/x,,b=/y", "entry 2 is empty"),
        ("a=/x,", "entry 2 is empty"),
        ("=/x", "entry 1 '=/x'"),
        ("a=", "entry 1 'a='"),
        ("a=b=c", "at most one `=` and one `@`"),
        ("org/a@v1@v2", "at most one `=` and one `@`"),
        ("a=/x,a=/y", "adapter id 'a' is already used by entry 'a=/x'"),
        ("org/a,org/a@v2", "adapter id 'org/a' is already used"),
        ("tgi=/x", "'tgi' is reserved"),
        ("my name=/x", "contains whitespace"),
    ],
)
def test_parse_lora_adapters_rejects(text, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        parse_lora_adapters(text)


def _write_adapter_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_adapter_rank_reads_rank_pattern(tmp_path):
    assert launcher.adapter_rank(_write_adapter_config(tmp_path / "a", r=8)) == 8
    pattern = {"q_proj": 32, "layers.1.self_attn.v_proj": 4}
    assert launcher.adapter_rank(_write_adapter_config(tmp_path / "b", r=8, rank_pattern=pattern)) == 32
    with pytest.raises(ValueError, match="positive integers"):
        launcher.adapter_rank(_write_adapter_config(tmp_path / "c", r="8"))


def test_adapter_rank_of_peft_adapters(tiny_adapters):
    ranks = {name: launcher.adapter_rank(path) for name, path in tiny_adapters.items()}
    assert ranks == {"r4_qv": 4, "r8_all": 8, "r16_mlp": 16, "r64_rs": 64, "r8_layer1": 8}


def test_resolve_adapters_errors_name_the_entry(tmp_path):
    specs = parse_lora_adapters(f"ok={_write_adapter_config(tmp_path / 'ok', r=4)},gone={tmp_path / 'none'}")
    with pytest.raises(SettingsError, match=re.escape(f"LORA_ADAPTERS entry 'gone={tmp_path / 'none'}'")):
        launcher.resolve_adapters(specs, None)
    # peft's save_pretrained of a named adapter writes out/<name>/: the message points there.
    _write_adapter_config(tmp_path / "out" / "pirate", r=8)
    with pytest.raises(SettingsError, match="found it in subfolder.*'pirate'"):
        launcher.resolve_adapters(parse_lora_adapters(f"p={tmp_path / 'out'}"), None)
    [resolved] = launcher.resolve_adapters(parse_lora_adapters(f"ok={tmp_path / 'ok'}"), None)
    assert (resolved.spec.id, resolved.path, resolved.rank) == ("ok", tmp_path / "ok", 4)


# ---- composition ---------------------------------------------------------------------------------


def _resolved(tmp_path, ranks):
    return [
        launcher.ResolvedAdapter(AdapterSpec(f"a{i}=/x", f"a{i}", f"/src/a{i}", None), tmp_path / f"a{i}", r)
        for i, r in enumerate(ranks)
    ]


def test_compose_writes_shared_values_into_both(tmp_path):
    s = load_settings(
        ["--num-shard", "2", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--port", "1234"]
    )
    workers, router = compose(s, tmp_path, _resolved(tmp_path, [4, 16]), ["/s/0", "/s/1"], "cpu")
    assert [w.rank for w in workers] == [0, 1]
    for w in workers:
        assert (w.world_size, w.dtype, w.device, w.model_dir) == (2, "float32", "cpu", tmp_path)
        assert (w.max_lora_rank, w.max_adapters, w.kv_cache_bytes, w.block_size) == (16, 2, 64 << 20, 16)
        assert WorkerConfig.from_json(w.to_json()) == w
    assert router.worker_uds == ["/s/0", "/s/1"]
    assert [(a.id, a.source, a.path) for a in router.adapters] == [
        ("a0", "/src/a0", str(tmp_path / "a0")),
        ("a1", "/src/a1", str(tmp_path / "a1")),
    ]
    assert (router.port, router.model_dir, router.shutdown_timeout_s) == (1234, str(tmp_path), 90.0)
    assert (router.api_key, router.payload_limit, router.grpc_port) == (None, 2_000_000, None)
    _, router = compose(load_settings(["--api-key", "k", "--grpc-port", "0"]), tmp_path, [], ["/s"], "cpu")
    assert (router.api_key, router.grpc_port) == ("k", 0)
    assert RouterConfig.model_validate_json(router.model_dump_json()) == router


def test_compose_rank_and_slot_limits(tmp_path):
    adapters = _resolved(tmp_path, [8, 32])
    workers, _ = compose(
        load_settings(["--max-lora-rank", "64", "--max-lora-adapters", "5"]),
        tmp_path,
        adapters,
        ["/s"],
        "cpu",
    )
    assert (workers[0].max_lora_rank, workers[0].max_adapters) == (64, 5)
    with pytest.raises(SettingsError, match=r"MAX_LORA_RANK \(16\) is below the rank 32 of adapter 'a1'"):
        compose(load_settings(["--max-lora-rank", "16"]), tmp_path, adapters, ["/s"], "cpu")
    with pytest.raises(SettingsError, match=r"MAX_LORA_ADAPTERS \(1\) is below the number of LORA_ADAPTERS"):
        compose(load_settings(["--max-lora-adapters", "1"]), tmp_path, adapters, ["/s"], "cpu")
    workers, router = compose(load_settings([]), tmp_path, [], ["/s"], "cpu")
    assert (workers[0].max_adapters, workers[0].max_lora_rank, router.adapters) == (0, 8, [])


def test_uds_paths_are_private(tmp_path):
    directory, paths = launcher.make_uds_paths(tmp_path / "srv" / "shard", 2)
    assert directory.parent == tmp_path / "srv" and directory.name.startswith("shard-")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert paths == [str(directory / "shard-0"), str(directory / "shard-1")]
    directory, paths = launcher.make_uds_paths(None, 1)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and len(paths) == 1
    directory.rmdir()
    with pytest.raises(SettingsError, match="SHARD_UDS_PATH"):
        launcher.make_uds_paths(tmp_path / ("x" * 120), 1)


def test_e2e_harness_clears_every_setting_but_the_caches():
    from tests.e2e.harness import _LAUNCHER_ENV, INHERITED_ENV

    assert {launcher.env_name(name) for name in Settings.model_fields} == _LAUNCHER_ENV | INHERITED_ENV


def test_worker_listening_without_grpc():
    # gRPC in the launcher process could abort or hang the router it forks later (grpc/grpc#43055).
    code = textwrap.dedent(
        """
        import os, socket, sys, tempfile
        import launcher
        path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "w.sock")
        assert not launcher.worker_listening(path)
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        assert not launcher.worker_listening(path)  # bound, not listening
        server.listen()
        assert launcher.worker_listening(path)
        assert "grpc" not in sys.modules, "the launcher imported grpc"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_bad_lora_adapters_entry_stops_startup(tiny_model_dir, tmp_path, caplog):
    bad = f"good={_write_adapter_config(tmp_path / 'good', r=8)},bad={tmp_path / 'missing'}"
    code = launcher.main(["--model-id", str(tiny_model_dir), "--lora-adapters", bad])
    assert code == 1
    assert f"LORA_ADAPTERS entry 'bad={tmp_path / 'missing'}'" in caplog.text


# ---- supervision with dummy children ---------------------------------------------------------------

DUMMY_CHILD = """
import os, signal, sys, time
from pathlib import Path
role, log, ready, behaviour = sys.argv[1:5]
def note(what):
    with open(log, "a") as f:
        f.write(f"{role} {what}\\n")
def on_term(signum, frame):
    note("term")
    if behaviour == "slow_stop":
        time.sleep(1.0)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term if behaviour != "ignore_term" else signal.SIG_IGN)
if behaviour == "loading":  # like a worker loading its model: no handler yet, never ready
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
note("start")
print(f"{role} says hello", flush=True)
if behaviour == "crash_at_start":
    print("boom: cannot load the thing", flush=True)
    sys.exit(3)
if behaviour != "loading":
    Path(ready).write_text(str(os.getpid()))
t0 = time.monotonic()
while True:
    time.sleep(0.05)
    if behaviour == "crash_later" and time.monotonic() - t0 > 1.0:
        print("fatal: lost my mind", flush=True)
        sys.exit(4)
"""

DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import logging
import launcher
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import launcher_supervision
launcher_supervision.KILL_GRACE_S = 1.0
tmp = Path({tmp!r})
def child(role, behaviour):
    ready = str(tmp / f"ready-{{role}}")
    return [sys.executable, str(tmp / "child.py"), role, str(tmp / "log"), ready, behaviour]
behaviours = {behaviours!r}
workers = [child(f"worker{{r}}", behaviours.get(f"worker{{r}}", "ok")) for r in range({n})]
code = launcher.supervise(
    workers,
    child("router", behaviours.get("router", "ok")),
    lambda rank: (tmp / f"ready-worker{{rank}}").exists(),
    graceful_timeout_s={timeout},
    router_stdin=bytes({stdin_bytes}) or None,
)
sys.exit(code)
"""


class Run:
    def __init__(
        self,
        tmp_path: Path,
        behaviours: dict[str, str],
        n: int = 2,
        timeout: float = 2.0,
        stdin_bytes: int = 0,
    ):
        self.tmp = tmp_path
        (tmp_path / "child.py").write_text(DUMMY_CHILD)
        script = DRIVER.format(
            root=str(ROOT),
            tmp=str(tmp_path),
            behaviours=behaviours,
            n=n,
            timeout=timeout,
            stdin_bytes=stdin_bytes,
        )
        (tmp_path / "driver.py").write_text(textwrap.dedent(script))
        self.proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py")], stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )

    def wait_for(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.tmp / path).exists():
            assert self.proc.poll() is None, f"launcher exited early: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.05)

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", err)]
        assert pids, err
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"child {pid} is left over (running or zombie)\n{err}"
        return self.proc.returncode, err

    def events(self) -> list[str]:
        path = self.tmp / "log"
        return path.read_text().split("\n")[:-1] if path.exists() else []


def test_sigterm_stops_router_then_workers_exit_0(tmp_path):
    run = Run(tmp_path, {})
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    events = run.events()
    assert set(events[:2]) == {"worker0 start", "worker1 start"}
    assert events[2:4] == ["router start", "router term"]
    assert sorted(events[4:]) == ["worker0 term", "worker1 term"]
    assert "worker-0 | worker0 says hello" in err and "router | router says hello" in err


def test_a_router_that_does_not_read_its_stdin_cannot_block_the_launcher(tmp_path):
    run = Run(tmp_path, {}, stdin_bytes=4 << 20)  # far more than a pipe holds; the dummy never reads
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish(timeout=30)
    assert code == 0, err


def test_a_signal_delivered_twice_at_once_stays_graceful(tmp_path):
    # `make serve` gets the group's SIGTERM and forwards it: the launcher sees two at once.
    run = Run(tmp_path, {"router": "slow_stop"}, n=1)
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert "killing everything" not in err


def test_a_later_second_signal_kills_at_once(tmp_path):
    run = Run(tmp_path, {"router": "ignore_term"}, n=1, timeout=60)
    run.wait_for("ready-router")
    start = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    time.sleep(launcher.FORCE_AFTER_S + 0.5)
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 1 and "SIGINT again: killing everything now" in err, err
    assert time.monotonic() - start < 30


def test_sigint_works_like_sigterm(tmp_path):
    run = Run(tmp_path, {}, n=1)
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 0, err


def test_sigterm_while_a_worker_loads_exits_0(tmp_path):
    run = Run(tmp_path, {"worker0": "loading"}, n=1)
    deadline = time.monotonic() + 30
    while "worker0 start" not in run.events():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert "router start" not in run.events()


def test_worker_failing_at_startup_stops_everything(tmp_path):
    run = Run(tmp_path, {"worker1": "crash_at_start"})
    code, err = run.finish()
    assert code == 1
    assert "worker-1 (pid" in err and "exited with code 3" in err
    assert "boom: cannot load the thing" in err.split("its last output:")[1]
    assert "router start" not in run.events()
    assert "worker0 term" in run.events()


def test_worker_dying_while_serving_stops_router_and_exits_1(tmp_path):
    run = Run(tmp_path, {"worker0": "crash_later"})
    code, err = run.finish()
    assert code == 1
    assert "exited with code 4" in err and "fatal: lost my mind" in err
    assert {"router term", "worker1 term"} <= set(run.events())


def test_worker_killed_reports_the_signal(tmp_path):
    run = Run(tmp_path, {})
    run.wait_for("ready-router")
    os.kill(int((tmp_path / "ready-worker1").read_text()), signal.SIGKILL)
    code, err = run.finish()
    assert code == 1
    assert "worker-1 (pid" in err and "was killed by SIGKILL" in err


def test_router_failing_stops_workers(tmp_path):
    run = Run(tmp_path, {"router": "crash_at_start"})
    code, err = run.finish()
    assert code == 1
    assert "router (pid" in err and "exited with code 3" in err
    assert {"worker0 term", "worker1 term"} <= set(run.events())


def test_router_ignoring_sigterm_is_killed_after_the_window(tmp_path):
    run = Run(tmp_path, {"router": "ignore_term"}, n=1, timeout=0.5)
    run.wait_for("ready-router")
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 1 and "did not stop within" in err
    assert time.monotonic() - start < 30
    assert "worker0 term" in run.events()


def test_children_do_not_outlive_a_killed_launcher(tmp_path):
    run = Run(tmp_path, {}, n=1)
    run.wait_for("ready-router")
    run.proc.kill()
    run.proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while {"router term", "worker0 term"} - set(run.events()):
        assert time.monotonic() < deadline, run.events()
        time.sleep(0.05)
