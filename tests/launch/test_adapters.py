"""LORA_ADAPTERS: TGI's entry forms, the errors naming the entry, and each adapter's LoRA rank."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launch.adapters import AdapterSpec, adapter_lora_rank, parse_lora_adapters, resolve_adapters
from launch.settings import SettingsError


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


def test_adapter_lora_rank_reads_rank_pattern(tmp_path):
    assert adapter_lora_rank(_write_adapter_config(tmp_path / "a", r=8)) == 8
    pattern = {"q_proj": 32, "layers.1.self_attn.v_proj": 4}
    assert adapter_lora_rank(_write_adapter_config(tmp_path / "b", r=8, rank_pattern=pattern)) == 32
    with pytest.raises(ValueError, match="positive integers"):
        adapter_lora_rank(_write_adapter_config(tmp_path / "c", r="8"))


def test_adapter_lora_rank_of_peft_adapters(tiny_adapters):
    lora_ranks = {name: adapter_lora_rank(path) for name, path in tiny_adapters.items()}
    assert lora_ranks == {"r4_qv": 4, "r8_all": 8, "r16_mlp": 16, "r64_rs": 64, "r8_layer1": 8}


def test_resolve_adapters_errors_name_the_entry(tmp_path):
    specs = parse_lora_adapters(f"ok={_write_adapter_config(tmp_path / 'ok', r=4)},gone={tmp_path / 'none'}")
    with pytest.raises(SettingsError, match=re.escape(f"LORA_ADAPTERS entry 'gone={tmp_path / 'none'}'")):
        resolve_adapters(specs, None)
    # peft's save_pretrained of a named adapter writes out/<name>/: the message points there.
    _write_adapter_config(tmp_path / "out" / "pirate", r=8)
    with pytest.raises(SettingsError, match="found it in subfolder.*'pirate'"):
        resolve_adapters(parse_lora_adapters(f"p={tmp_path / 'out'}"), None)
    [resolved] = resolve_adapters(parse_lora_adapters(f"ok={tmp_path / 'ok'}"), None)
    assert (resolved.spec.id, resolved.path, resolved.lora_rank) == ("ok", tmp_path / "ok", 4)
