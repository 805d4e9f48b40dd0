"""The launcher end to end: launcher -> workers + router -> HTTP, on a tiny random model in float32.

float32 because there greedy decoding is batch-invariant (bf16 is not, see feasibility.md section 3), so a
request must give exactly the same tokens alone and in a mixed-adapter batch, and with 1 or 2 ranks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.harness import Server

pytestmark = pytest.mark.slow

PROMPTS = ["Hello who are you?", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
NEW_TOKENS = 12
# Long enough that a generation is still running when the test signals (a few seconds on a busy CPU).
LONG_TOKENS = 1500  # the native CPU kernels make 300 a second's work on the tiny model


def tiny_env(model_dir, adapters, **extra) -> dict[str, str]:
    return {
        "MODEL_ID": str(model_dir),
        "DTYPE": "float32",
        # `auto` (cuda when there is a GPU) to run these on a GPU machine; CPU by default.
        "DEVICE": os.environ.get("MULTILORA_E2E_DEVICE", "cpu"),
        "LORA_ADAPTERS": ",".join(f"{name}={path}" for name, path in adapters.items()),
        "KV_CACHE_MEMORY": "64MiB",
        "GRACEFUL_TERMINATION_TIMEOUT": "60",
        **extra,
    }


def cases(adapters) -> list[tuple[str, str | None]]:
    return [(prompt, adapter) for adapter in [None, *adapters] for prompt in PROMPTS[:2]]


def run(server: Server, prompt: str, adapter: str | None, max_new_tokens: int = NEW_TOKENS) -> dict:
    params = {"max_new_tokens": max_new_tokens, "details": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    status, body = server.generate(prompt, **params)
    assert status == 200, body
    return body


def token_ids(body: dict) -> list[int]:
    return [t["id"] for t in body["details"]["tokens"]]


@pytest.fixture(scope="module")
def tiny_server(e2e_model_dir, e2e_adapters, tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("tp1") / "launcher.log", env=tiny_env(e2e_model_dir, e2e_adapters)
    )
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def solo_outputs(tiny_server, e2e_adapters):
    """Each case run alone, one request at a time."""
    return {case: run(tiny_server, *case) for case in cases(e2e_adapters)}


def test_adapters_are_loaded_and_change_the_output(tiny_server, solo_outputs, e2e_adapters):
    log = tiny_server.log()
    for name in e2e_adapters:
        assert f"Loading adapter weights into model: {name}" in log
    for prompt in PROMPTS[:2]:
        outputs = [token_ids(solo_outputs[(prompt, adapter)]) for adapter in [None, *e2e_adapters]]
        assert len({tuple(o) for o in outputs}) == len(outputs), outputs


def test_concurrent_mixed_adapters_equal_solo(tiny_server, solo_outputs):
    # Every case three times, all at once: the scheduler batches rows of different adapters together.
    requests = list(solo_outputs) * 3
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda case: run(tiny_server, *case), requests))
    for case, body in zip(requests, results, strict=True):
        assert body["generated_text"] == solo_outputs[case]["generated_text"], case
        assert token_ids(body) == token_ids(solo_outputs[case]), case


def test_unknown_adapter_is_422(tiny_server):
    status, body = tiny_server.generate("Hello", max_new_tokens=4, adapter_id="no-such-adapter")
    assert status == 422, body
    assert body["error_type"] == "validation"
    assert "no-such-adapter" in body["error"]


def test_two_ranks_equal_one(e2e_model_dir, e2e_adapters, solo_outputs, tmp_path):
    server = Server(tmp_path / "launcher.log", env=tiny_env(e2e_model_dir, e2e_adapters, NUM_SHARD="2"))
    try:
        server.wait_ready()
        assert {"worker-0", "worker-1", "router"} <= set(server.child_pids())
        for case, expected in solo_outputs.items():
            body = run(server, *case)
            assert token_ids(body) == token_ids(expected), case
            assert body["generated_text"] == expected["generated_text"], case
    finally:
        assert server.stop() == 0, server.log()


def _fire(server: Server, n: int, results: list, max_new_tokens: int = LONG_TOKENS) -> list[threading.Thread]:
    """Start `n` long requests in threads; each appends (case index, status, body, finish time)."""

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            status, body = server.generate(prompt, timeout=120, max_new_tokens=max_new_tokens, details=True)
        except OSError as err:  # the connection dropped: also an error the client sees, not a hang
            status, body = None, {"error": repr(err)}
        results.append((i, status, body, time.monotonic()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_sigterm_lets_requests_in_flight_finish(e2e_model_dir, e2e_adapters, tmp_path):
    server = Server(tmp_path / "launcher.log", env=tiny_env(e2e_model_dir, e2e_adapters))
    try:
        server.wait_ready()
        # Reference: one long request alone (also tells how long one takes).
        start = time.monotonic()
        expected = run(server, PROMPTS[0], None, LONG_TOKENS)
        duration = time.monotonic() - start
        results: list = []
        threads = _fire(server, 4, results)
        time.sleep(min(1.0, duration / 4))
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        code = server.wait()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.wait()
    log = server.log()
    assert code == 0, log
    assert len(results) == 4
    for i, status, body, _ in results:
        assert status == 200, (status, body, log)
        if i % len(PROMPTS) == 0:
            assert token_ids(body) == token_ids(expected)
    assert max(done for *_, done in results) > signalled, "no request was still in flight at SIGTERM"


def test_worker_killed_mid_generation_fails_requests_and_launcher(e2e_model_dir, e2e_adapters, tmp_path):
    server = Server(tmp_path / "launcher.log", env=tiny_env(e2e_model_dir, e2e_adapters))
    try:
        server.wait_ready()
        results: list = []
        threads = _fire(server, 4, results)
        time.sleep(1.0)
        os.kill(server.child_pids()["worker-0"], signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a request hung after its worker died"
        code = server.wait(timeout=90)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.wait()
    log = server.log()
    assert code != 0, log
    assert "worker-0 (pid" in log and "was killed by SIGKILL" in log
    late = [(status, body) for _, status, body, done in results if done > killed]
    assert late, "every request finished before the kill; nothing was in flight"
    for status, body in late:
        assert status is None or status >= 400, (status, body)


def test_bad_lora_adapters_entry_stops_startup(e2e_model_dir, tmp_path):
    server = Server(
        tmp_path / "launcher.log",
        env={"MODEL_ID": str(e2e_model_dir), "LORA_ADAPTERS": f"ok={tmp_path},=/nowhere"},
    )
    assert server.wait(timeout=120) != 0
    assert "LORA_ADAPTERS entry 2 '=/nowhere'" in server.log()
    assert "started" not in server.log()  # nothing was spawned


def test_adapter_the_router_refuses_stops_startup(e2e_model_dir, e2e_adapters, tmp_path):
    # The launcher only reads adapter_config.json; the weights are checked when the router loads them.
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((e2e_adapters["b_r8"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    adapters = {"fine": e2e_adapters["a_r4"], "broken": bad}
    server = Server(tmp_path / "launcher.log", env=tiny_env(e2e_model_dir, adapters))
    assert server.wait(timeout=180) != 0
    log = server.log()
    assert "router (pid" in log and "exited with code" in log, log
    assert "broken" in log.split("its last output:")[1], log
