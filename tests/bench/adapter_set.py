"""Random PEFT adapters for the benchmark, made reproducibly from a seed and kept in a cache dir.

The kinds:
- `mixed`: ranks 8, 16, 32 in turn, on all seven projections (q, k, v, o, gate, up, down);
- `small`: rank 8 on q and v only, for runs with hundreds of adapters resident (about 1.8 MiB each on
  SmolLM2 in float32, so 1000 of them fit a 2 GiB ADAPTER_MEMORY);
- `ranks`: ranks 4, 8, 16, 32, 64 on each of q/v, attention (q, k, v, o) and all seven, in turn (issue
  15's memory target: mixed ranks and module sets);
- `cold`: rank 8 on all seven, about 10 MB in float32 on SmolLM2 (issue 15's cold-start target).

For each (rank, targets) peft writes one template adapter (tests/adapter_factory.py); adapter i is that
template's files with its A and B redrawn from seed (seed, i). So every file is what peft writes, and a
thousand adapters take seconds, not a model load each. The cache is keyed by the model's config (the
shapes the adapters fit), so adapters for one model are never served to another.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.adapter_factory import ALL_TARGETS, save_random_adapter

QV = ("q_proj", "v_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
KINDS = {
    "mixed": [(8, ALL_TARGETS), (16, ALL_TARGETS), (32, ALL_TARGETS)],
    "small": [(8, QV)],
    "ranks": [(r, targets) for targets in (QV, ATTENTION, ALL_TARGETS) for r in (4, 8, 16, 32, 64)],
    "cold": [(8, ALL_TARGETS)],
}
WEIGHT_STD = 0.02  # small enough that outputs stay text-like; the figures do not depend on it
WEIGHTS = "adapter_model.safetensors"


def default_cache_dir() -> Path:
    root = os.environ.get("MULTILORA_CACHE") or "~/.cache/multilora"
    return Path(root).expanduser() / "bench-adapters"


def adapter_spec(kind: str, i: int) -> tuple[int, tuple[str, ...]]:
    specs = KINDS[kind]
    return specs[i % len(specs)]


def make_adapters(model_dir: Path, kind: str, n: int, seed: int = 0, cache_dir: Path | None = None):
    """{name: dir} of n adapters of `kind` (names `<kind>0000`...), made once into the cache."""
    return {f"{kind}{i:04d}": make_adapter(model_dir, kind, i, seed, cache_dir) for i in range(n)}


def make_adapter(model_dir: Path, kind: str, i: int, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The directory of adapter `i` of `kind` (as in `make_adapters`), made once into the cache."""
    root = (cache_dir or default_cache_dir()) / f"{kind}-s{seed}-{model_key(model_dir)}"
    rank, targets = adapter_spec(kind, i)
    template = _template(model_dir, root / f"_template-r{rank}-{len(targets)}", rank, targets)
    return _clone(template, root / f"{i:04d}", seed=seed * 100_003 + i)


def model_key(model_dir: Path) -> str:
    """A short digest of the model's config.json: models of one shape share their adapters."""
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]


def _template(model_dir: Path, out: Path, rank: int, targets: tuple[str, ...]) -> Path:
    if not (out / WEIGHTS).is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_random_adapter(model_dir, tmp, r=rank, alpha=2 * rank, target_modules=targets, seed=0)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _clone(template: Path, out: Path, seed: int) -> Path:
    if (out / WEIGHTS).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "adapter_config.json", out / "adapter_config.json")
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: (torch.randn(v.shape, generator=gen) * WEIGHT_STD).to(v.dtype)
        for k, v in sorted(load_file(template / WEIGHTS).items())
    }
    save_file(tensors, out / (WEIGHTS + ".tmp"))
    os.replace(out / (WEIGHTS + ".tmp"), out / WEIGHTS)  # written last: its presence means complete
    return out


def link_root(root: Path, adapters: dict[str, Path]) -> Path:
    """An adapter root (LORA_ADAPTER_ROOTS) holding `adapters` as `root/<name>/`, whose files are hard
    links to the given directories' (so no bytes are copied, and no symbolic link leads out of it)."""
    for name, src in adapters.items():
        (root / name).mkdir(parents=True)
        for f in ("adapter_config.json", WEIGHTS):
            os.link(src / f, root / name / f)
    return root


def launcher_spec(adapters: dict[str, Path]) -> str:
    """LORA_ADAPTERS for these adapters: `name=/dir,...`."""
    return ",".join(f"{name}={path}" for name, path in adapters.items())
