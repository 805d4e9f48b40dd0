"""LORA_ADAPTERS: TGI's entry syntax parsed, each entry resolved to a local PEFT directory and its LoRA rank.

Errors are `SettingsError`s naming the entry as written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from launch.model_source import ModelSourceError, resolve_adapter_dir
from launch.settings import SettingsError

# An adapter can never be named like this: OpenAI requests use `model: "tgi"` for the base model (TGI).
RESERVED_ADAPTER_IDS = ("tgi",)

# TGI's grammar (server/text_generation_server/utils/adapter.py): source, `name=source`, optional `@rev`.
_ENTRY_RE = re.compile(r"^([^=@]+)(?:=([^@]+))?(?:@(.+))?$")


@dataclass(frozen=True)
class AdapterSpec:
    """One LORA_ADAPTERS entry, parsed."""

    entry: str  # as written, for error messages
    id: str  # what requests pass as adapter_id
    source: str  # hub repo id or local path
    revision: str | None


@dataclass(frozen=True)
class ResolvedAdapter:
    spec: AdapterSpec
    path: Path
    lora_rank: int


def parse_lora_adapters(text: str) -> list[AdapterSpec]:
    """Parse LORA_ADAPTERS; raises SettingsError naming the first bad entry."""
    if not text.strip():
        return []
    specs: list[AdapterSpec] = []
    seen: dict[str, str] = {}
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        where = f"LORA_ADAPTERS entry {position} {entry!r}"
        if not entry:
            raise SettingsError(f"LORA_ADAPTERS entry {position} is empty (in {text!r})")
        match = _ENTRY_RE.match(entry)
        if match is None or entry.count("=") > 1 or entry.count("@") > 1:
            raise SettingsError(
                f"{where}: expected `org/name`, `org/name@revision`, `name=/local/dir` or "
                "`name=org/repo@revision` (at most one `=` and one `@`)"
            )
        first, second, revision = (g.strip() if g is not None else None for g in match.groups())
        name, source = (first, second) if second is not None else (first, first)
        if not name:
            raise SettingsError(f"{where}: the adapter name before `=` is empty")
        if not source:
            raise SettingsError(f"{where}: the path or repo id after `=` is empty")
        if revision == "":
            raise SettingsError(f"{where}: the revision after `@` is empty")
        if re.search(r"\s", name):
            raise SettingsError(f"{where}: the adapter name {name!r} contains whitespace")
        if name in RESERVED_ADAPTER_IDS:
            raise SettingsError(f"{where}: {name!r} is reserved (OpenAI requests use it for the base model)")
        if name in seen:
            raise SettingsError(f"{where}: adapter id {name!r} is already used by entry {seen[name]!r}")
        seen[name] = entry
        specs.append(AdapterSpec(entry=entry, id=name, source=source, revision=revision))
    return specs


def adapter_lora_rank(path: Path) -> int:
    """The largest LoRA rank in `path/adapter_config.json` (`r` and every `rank_pattern` value)."""
    config_file = path / "adapter_config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    lora_ranks = [raw.get("r"), *(raw.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in lora_ranks):
        raise ValueError(
            f"{config_file}: LoRA ranks {lora_ranks!r} (r and rank_pattern) must be positive integers"
        )
    return max(lora_ranks)


def resolve_adapters(specs: list[AdapterSpec], hf_cache_dir: Path | None) -> list[ResolvedAdapter]:
    """Local directories (downloaded when needed) and LoRA ranks of the adapters; SettingsError names the
    entry."""
    resolved = []
    for spec in specs:
        try:
            path = resolve_adapter_dir(spec.source, spec.revision, hf_cache_dir=hf_cache_dir)
            resolved.append(ResolvedAdapter(spec, path, adapter_lora_rank(path)))
        except (ModelSourceError, ValueError) as exc:
            raise SettingsError(f"LORA_ADAPTERS entry {spec.entry!r}: {exc}") from None
    return resolved
