"""launcher.py, the entry point: its --help, and a bad setting stopping startup before any child starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import launcher
from launch.model_source import DEFAULT_MODEL_ID
from launch.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _write_adapter_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


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


def test_bad_lora_adapters_entry_stops_startup(tiny_model_dir, tmp_path, caplog):
    bad = f"good={_write_adapter_config(tmp_path / 'good', r=8)},bad={tmp_path / 'missing'}"
    code = launcher.main(["--model-id", str(tiny_model_dir), "--lora-adapters", bad])
    assert code == 1
    assert f"LORA_ADAPTERS entry 'bad={tmp_path / 'missing'}'" in caplog.text
