"""`make bench-quick` keeps working: the suite runs end to end and writes its JSON and PNG.

Checks only that the files exist with the expected keys, never the figures (CI machines differ). The
quick suite serves a tiny random model, so its time is the harness's (six server startups, the baseline's
child, a few dozen short requests) on any CPU, whatever dtype the server picks there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.bench.hf_baseline import DTYPES
from tests.e2e.harness import ROOT

pytestmark = pytest.mark.slow

RUNS = {
    "base_lone", "base_saturated", "mixed8_lone", "mixed8_saturated", "mixed8_half_load", "small8_zipf",
    "many_registered", "hf_peft", "base_saturated_after", "small8_zipf_after",
}  # fmt: skip
RUN_FIGURES = {"output_tokens_per_s", "requests_per_s", "wall_s", "requests"}
STREAM_FIGURES = {
    "ttft_p50_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p99_s",
    "early_stops",
    "server_peak_rss_bytes",
}


def test_quick_suite_writes_json_and_png(tmp_path):
    command = [sys.executable, "-m", "tests.bench.suite", "--quick", "--out", str(tmp_path)]
    try:  # a limit under pytest-timeout's 600 s, so that a hang fails with the suite's output
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the quick suite ran past {err.timeout} s:\n{_tail(err.stdout)}\n{_tail(err.stderr)}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["mode"] == "quick"
    assert set(results["ratios"]) == {"P1", "P2", "P3", "P4", "P5", "P6"}
    for rid, ratio in results["ratios"].items():
        assert set(ratio) >= {"value", "target", "met", "measure", "detail"}, rid
        assert isinstance(ratio["value"], float), (rid, ratio)
    assert set(results["runs"]) >= RUNS
    for name, run in results["runs"].items():
        assert set(run) >= RUN_FIGURES, name
        assert run["output_tokens_per_s"] > 0, name
        if name != "hf_peft":
            assert set(run) >= STREAM_FIGURES, name
            assert run["failed"] == 0, run
    assert results["runs"]["hf_peft"]["peak_rss_bytes"] > 0
    dtype = results["model_dtype"]  # the server's own choice; the baseline and the probes follow it
    assert dtype in DTYPES
    assert results["runs"]["hf_peft"]["dtype"] == results["machine"]["dtype"] == dtype
    assert {s["model_dtype"] for s in results["servers"].values()} == {dtype}
    assert set(results["machine"]) >= {"copy_bytes_per_s", "gemm_flops_per_s", "cpu", "linear_pass_s"}
    for rid in ("P2", "P4", "P6"):  # the machine bounds need the linear passes and the prompt tokens
        assert isinstance(results["ratios"][rid]["machine_bound"], float), results["ratios"][rid]
    assert results["runs"]["mixed8_saturated"]["prompt_tokens"] > 0
    assert [s["concurrency"] for s in results["concurrency_sweep"]][0] == 1
    assert [s["registered"] for s in results["adapter_scaling"]][0] == 8
    small = {name: s for name, s in results["servers"].items() if name.startswith("small")}
    assert small and all(int(s["adapter_memory"]) > 0 for s in small.values()), small  # sized to hold them
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ratio in ("P1", "P6"):
        assert ratio in proc.stdout, "the ratios are printed"


def _tail(output: str | bytes | None) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else output or ""
    return text[-4000:]
