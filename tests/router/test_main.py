"""`python -m router` as a process: startup logs, exit codes, graceful shutdown on SIGTERM; no torch."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import aiohttp

from router.config import AdapterSource, RouterConfig
from tests.router.conftest import ADAPTER_IDS, BASE_MODEL_ID, SCRIPTS
from tests.router.fake_worker import serve_fakes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tokenizer_dir, paths, **kw) -> RouterConfig:
    return RouterConfig(
        model_id=BASE_MODEL_ID,
        model_dir=str(tokenizer_dir),
        worker_uds=paths,
        hostname="127.0.0.1",
        port=_free_port(),
        **kw,
    )


async def _spawn(config: RouterConfig) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--config-json", config.model_dump_json(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def _run_to_end(config: RouterConfig, timeout: float = 20.0) -> tuple[int, str]:
    proc = await _spawn(config)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode()


def test_router_does_not_import_torch():
    code = "import sys, router.__main__, router.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_config_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "router", "--config-json", '{"model_id": "m"}'], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Invalid --config-json" in proc.stderr and "worker_uds" in proc.stderr


def test_config_from_stdin():
    proc = subprocess.run(
        [sys.executable, "-m", "router", "--config-json", "-"],
        input='{"model_id": "from-stdin"}',
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Invalid --config-json" in proc.stderr and "worker_uds" in proc.stderr
    assert "from-stdin" in proc.stderr  # the input pydantic quotes came from stdin


async def test_unreachable_workers_exit_1(tiny_tokenizer_dir, sock_dir):
    config = _config(tiny_tokenizer_dir, [f"{sock_dir}/missing.sock"], worker_connect_timeout_s=0.5)
    code, out = await _run_to_end(config)
    assert code == 1
    assert "Router startup failed: workers not ready after" in out


async def test_failed_adapter_exits_1_naming_it(tiny_tokenizer_dir, sock_dir):
    async with serve_fakes(sock_dir, 2, script={}) as (fakes, paths):
        fakes[1].failing_adapters.add("bad-adapter")
        adapters = [AdapterSource(id=a, source=a, path=f"/p/{a}") for a in ("fine", "bad-adapter")]
        code, out = await _run_to_end(_config(tiny_tokenizer_dir, paths, adapters=adapters))
    assert code == 1
    assert "Loading adapter weights into model: fine" in out
    assert "failed to load adapter 'bad-adapter'" in out and "rank 1" in out


async def test_serves_then_drains_on_sigterm(tiny_tokenizer_dir, sock_dir, encode):
    script = {slot: encode(text) for slot, text in SCRIPTS.items()}
    async with serve_fakes(sock_dir, 2, script=script) as (fakes, paths):
        adapters = [AdapterSource(id=a, source=a, path=f"/p/{a}") for a in ADAPTER_IDS]
        config = _config(tiny_tokenizer_dir, paths, adapters=adapters, shutdown_timeout_s=10.0)
        proc = await _spawn(config)
        base = f"http://127.0.0.1:{config.port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with asyncio.timeout(15):
                    while True:
                        try:
                            async with http.get(f"{base}/health") as resp:
                                if resp.status == 200:
                                    break
                        except aiohttp.ClientConnectionError:
                            pass
                        await asyncio.sleep(0.1)
                for f in fakes:
                    f.step_delay = 0.03
                body = {"inputs": "Hi", "parameters": {"max_new_tokens": 20, "adapter_id": "adapter-two"}}
                in_flight = asyncio.create_task(http.post(f"{base}/generate", json=body))
                async with asyncio.timeout(5):
                    while len(fakes[0].requests("Decode")) < 2:
                        await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                resp = await in_flight
                assert resp.status == 200
                assert (await resp.json())["generated_text"] == SCRIPTS[2]
            code = await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        out = (await proc.stdout.read()).decode()
    assert code == 0, out
    for aid in ADAPTER_IDS:
        assert f"Loading adapter weights into model: {aid}" in out
    assert "Router listening on http://127.0.0.1" in out and "Router stopped" in out
