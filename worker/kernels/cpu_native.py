"""Native CPU kernels (`csrc/*.cpp`, built on use) and the LoRA site op over the adapter pool on them.

The build serves every C++ source in csrc/ (`lora_cpu`, `attention_cpu`: `cpu_attention.py` wraps
the latter); each is its own extension with its own build key. The LoRA op: semantics are
`reference.lora_site_ref` (the spec; arguments in `pool_args.py`); the `.cpp` header states the
layouts and the kernel design. What this module adds:

- The build: torch.utils.cpp_extension.load (ninja, g++), `-O3 -march=native -fopenmp` (the build
  machine's own instruction set; OpenMP so at::parallel_for uses torch's threads), once per process.
  The build directory is `<cache root>/<source>-<key>` (cache root: ~/.cache/multilora/cpu_kernels)
  with key = a hash of the source, the compile flags, torch's version, the Python ABI and this CPU's
  flags (/proc/cpuinfo), so a build made on one CPU kind (an AVX-512 Xeon) is never loaded on another
  (an AVX2-only EPYC), and later processes only load it.
- The fallback: when no compiler is present or the build fails, `load_native` returns None, logs why
  once, and `select_lora_ops` serves the torch path (`torch_ops.py`).
- One C++ call per site for all rows, in any row order (prompt and decode rows alike): the kernel groups
  rows by adapter itself, reads `rows.row_adapter` and the parts' device tables (CPU tensors here) and
  checks every index it reads on the host, raising ValueError naming the argument.
- dtypes: the pool is in the model dtype (16-bit pages widened in registers, float32 accumulation); x
  and out share a dtype, float32, bfloat16 or float16.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from worker.kernels.pool_args import PoolPart, StepRows

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE_PATH = CSRC / "lora_cpu.cpp"  # the LoRA kernel's source (the default of build and build_key)
POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ARGS_KEPT = 1024  # sites' argument lists remembered: every site of a step (4 per layer) and then some


def cpu_flags() -> str:
    """This CPU's feature flags (the first `flags` line of /proc/cpuinfo), or the platform's
    description where there is none: part of the build key, so builds never cross CPU kinds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def compile_flags(march: str) -> list[str]:
    return ["-O3", f"-march={march}", "-fopenmp", "-std=c++17"]


def default_cache_root(multilora_cache: Path | str = "~/.cache/multilora") -> Path:
    """Where builds go: `cpu_kernels` under multilora's cache (MULTILORA_CACHE)."""
    return Path(multilora_cache).expanduser() / "cpu_kernels"


def source_path(source: str = "lora_cpu") -> Path:
    """csrc/<source>.cpp; ValueError for a name that is not one."""
    path = CSRC / f"{source}.cpp"
    if not source.isidentifier() or not path.is_file():
        raise ValueError(f"no C++ kernel source csrc/{source}.cpp")
    return path


def build_key(march: str, source: str = "lora_cpu") -> str:
    """A hash of what the built module depends on: source and the headers beside it, flags, torch and
    Python, and the CPU it is built on."""
    h = hashlib.sha256(source_path(source).read_bytes())
    for header in sorted(CSRC.glob("*.h")):
        h.update(b"\0" + header.read_bytes())
    for part in (*compile_flags(march), torch.__version__, sys.implementation.cache_tag, cpu_flags()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build(
    march: str = "native", cache_root: Path | None = None, verbose: bool = False, source: str = "lora_cpu"
) -> ModuleType:
    """Compile (or load the cached build of) the extension csrc/<source>.cpp for `march` into
    `cache_root` (default ~/.cache/multilora/cpu_kernels); raises when it cannot. Processes building the
    same key at once (the ranks of a TP worker) wait on the build directory's lock: one compiles, the
    others load."""
    from torch.utils.cpp_extension import load

    key = build_key(march, source)
    directory = (cache_root or default_cache_root()) / f"{source}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"{source}_{march.replace('-', '_')}_{key}",  # distinct per build: several may share a process
        sources=[str(source_path(source))],
        extra_cflags=compile_flags(march),
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        verbose=verbose,
    )


@functools.cache
def load_native(march: str = "native", cache_root: Path | None = None) -> ModuleType | None:
    """The extension built for this machine, or None (logged once) when it cannot be built here."""
    try:
        module = build(march, cache_root)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path serves instead
        log.warning("native CPU LoRA kernel unavailable (%s: %s); using the torch path", type(e).__name__, e)
        return None
    log.info("native CPU LoRA kernel: %s", module.__file__)
    return module


class NativeCpuLoraOps:
    """The pool's LoRA site op as one native call per site (see the module docstring)."""

    # The kernel groups rows by adapter itself: decode rows need not form segments.
    decode_uses_segments = False
    mixes_prompt_and_decode = True  # rows of any kind, in any order: one call per site for a join step

    def __init__(self, module: ModuleType):
        self._site = module.lora_site
        # id(parts) -> (parts, the kernel's per-part lists): a step passes each site the same tuple in
        # every call, and building the lists is a quarter of a small call's cost. Tuples only (their
        # PoolParts are frozen), held so that no id is reused while an entry lives.
        self._args: dict[int, tuple] = {}

    def pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The model dtype: 16-bit pages halve the bytes streamed, and are widened in registers."""
        if model_dtype not in POOL_DTYPES:
            raise ValueError(f"NativeCpuLoraOps supports {list(POOL_DTYPES)} models, got {model_dtype}")
        return model_dtype

    def row_order(self, adapters: list[int], adapter_lora_ranks: dict[int, int]) -> list[int]:
        """Sequences grouped by adapter slot (stable). The kernel takes rows in any order (it groups
        them itself); grouped, one adapter's rows of x and out are neighbours in memory."""
        return sorted(range(len(adapters)), key=adapters.__getitem__)

    def lora_site(
        self,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        rows: StepRows,
        out: torch.Tensor,
    ) -> None:
        """Semantics: for every part p, out[i, o_p:o_p+h_out_p] += (x[i] @ a_view[a_rows_p[g, :r]].T)
        @ b_view_p[b_rows_p[g, :r]] with g = rows.row_adapter[i], r = lora_ranks_p[g]; rows with g = -1
        and parts with r = 0 are skipped (`reference.lora_site_ref`).

        x: [T, h_in] float32 / bfloat16 / float16 with contiguous rows (a copy is made otherwise).
        a_view: [num_rows(h_in), h_in] pool dtype. parts: the site's modules, disjoint output columns.
        rows: the adapter of each row (row_adapter; any order). out: [T, h_out_local] x's dtype, updated
        in place; the delta is summed in float32 and rounded once. Raises ValueError naming a bad
        argument (no pool row is read before every index is checked).
        """
        if not parts or rows.num_rows == 0:
            return
        if x.stride(-1) != 1:
            x = x.contiguous()
        if out.stride(-1) != 1:  # computed on a copy with contiguous rows, then written back
            tmp = out.contiguous()
            self.lora_site(x, a_view, parts, rows, tmp)
            out.copy_(tmp)
            return
        args = self._args.get(id(parts))
        if args is None or args[0] is not parts:
            args = (
                parts,
                [p.b_view for p in parts],
                [p.a_rows for p in parts],
                [p.b_rows for p in parts],
                [p.lora_ranks for p in parts],
                [p.out_offset for p in parts],
            )
            if type(parts) is tuple:
                if len(self._args) >= _ARGS_KEPT:
                    self._args.clear()
                self._args[id(parts)] = args
        self._site(x, a_view, *args[1:], rows.row_adapter, len(rows.adapters), out)


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.kernels.cpu_native [--cache-root DIR]`: build the kernels now (make test and make
    serve do, so that the first worker does not spend its startup compiling). A failed build is reported,
    not an error: the torch path serves."""
    import argparse
    import os

    from worker.kernels.cpu_attention import load_native_attention
    from worker.kernels.cpu_fused import load_native_fused

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    default = default_cache_root(os.environ.get("MULTILORA_CACHE", "~/.cache/multilora"))
    parser.add_argument("--cache-root", type=Path, default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = load_native(cache_root=args.cache_root)
    print(f"native CPU LoRA kernel: {module.__file__ if module else 'unavailable (the torch path serves)'}")
    attention = load_native_attention(cache_root=args.cache_root)
    where = attention.module.__file__ if attention else "unavailable (the torch path serves)"
    print(f"native CPU attention kernel: {where}")
    fused = load_native_fused(cache_root=args.cache_root)
    where = fused.module.__file__ if fused else "unavailable (torch's ops serve)"
    print(f"native CPU fused ops: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
