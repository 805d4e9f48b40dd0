"""The CUDA source of the LoRA pool kernels (`csrc/lora_gather_matmul.cu`) as the wrapper sees it.

Its compile-time sizes (read from the source's own `#define`s, so the launches cannot drift from them),
the template instances the wrapper launches (`NAME_EXPRESSIONS`, which the nvcc compile test
instantiates too) and the process-wide CuPy module that compiles them. `worker/kernels/cuda.py` holds
the launches.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from pathlib import Path

import torch

SOURCE_PATH = Path(__file__).resolve().parents[2] / "csrc" / "lora_gather_matmul.cu"
# No options of our own: CuPy adds the architecture and its C++ dialect (the source is plain C++14).
COMPILE_OPTIONS: tuple[str, ...] = ()

# torch dtype -> the element type of the kernel templates.
KERNEL_TYPES = {torch.bfloat16: "Bf16", torch.float16: "Fp16", torch.float32: "Fp32"}
# The dtypes of the tensor-core sgmv kernels (16-bit operands; mma.sync needs sm_80+).
MMA_TYPES = (torch.bfloat16, torch.float16)

# C's integer operators; `/` truncates, which is floor division on the non-negative sizes of the macros.
_C_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,
}


def source_defines(text: str) -> dict[str, int]:
    """The `#define NAME value` macros of a CUDA source whose values are integer expressions (literals,
    + - * /, parentheses and the macros defined above them), evaluated; other macros are left out."""
    defines: dict[str, int] = {}
    for name, expression in re.findall(r"^#define[ \t]+(\w+)[ \t]+(.*?)[ \t]*(?://.*)?$", text, re.MULTILINE):
        try:
            defines[name] = _c_integer(ast.parse(expression, mode="eval").body, defines)
        except (SyntaxError, ValueError):
            continue
    return defines


def _c_integer(node: ast.AST, defines: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id in defines:
        return defines[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _C_OPERATORS:
        return _C_OPERATORS[type(node.op)](_c_integer(node.left, defines), _c_integer(node.right, defines))
    raise ValueError(f"not an integer expression of literals and macros: {ast.unparse(node)}")


# The kernels' compile-time sizes that their launches must agree with, read from the source itself.
_DEFINES = source_defines(SOURCE_PATH.read_text())
SHRINK_RANK_ROWS = _DEFINES["LORA_SHRINK_RANK_ROWS"]  # rank rows per lora_bgmv_shrink block
SHRINK_CHUNKS = _DEFINES["LORA_SHRINK_CHUNKS"]  # vectors of x per lora_bgmv_shrink thread and step
SHRINK_STAGE = _DEFINES["LORA_SHRINK_STAGE"]  # 16-byte vectors per thread of lora_bgmv_shrink's staging
EXPAND_ROWS_IN_FLIGHT = _DEFINES["LORA_EXPAND_ROWS_IN_FLIGHT"]  # rank rows of B per lora_bgmv_expand thread
# lora_sgmv_shrink_mma tiles (MT, NG): 16 * MT rows by 8 * NG rank rows per block, and its warps.
MMA_SHRINK_TILES = {(2, 2): _DEFINES["LORA_MMA_TILE_WARPS"], (1, 1): _DEFINES["LORA_MMA_SMALL_TILE_WARPS"]}
MMA_STAGES = _DEFINES["LORA_MMA_STAGES"]  # depth of each warp's cp.async ring in lora_sgmv_shrink_mma
MMA_K = _DEFINES["LORA_MMA_K"]  # elements of h_in per warp chunk in lora_sgmv_shrink_mma
MMA_COLS = _DEFINES["LORA_MMA_COLS"]  # columns of out per warp in lora_sgmv_expand_mma
MAX_THREADS = _DEFINES["LORA_MAX_THREADS"]  # the kernels size their shared memory for it
# The wrapper's own launch choices, which the kernels take as template arguments or block shapes.
GENERIC_ROWS = 4  # rows of x fused per block by the generic lora_shrink / lora_expand (sgmv fallback)
MMA_EXPAND_WARPS = 4  # warps per lora_sgmv_expand_mma block (16 rows, MMA_COLS columns per warp)
DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel may use without raising its limit


def wide_vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte access."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def kernel_name(kernel: str, dtype: torch.dtype, *params: int) -> str:
    """The name expression of one template instance, e.g. 'lora_bgmv_shrink<Bf16, 8>'."""
    return f"lora_{kernel}<{', '.join([KERNEL_TYPES[dtype], *map(str, params)])}>"


def mma_shrink_smem(mt: int, ng: int, warps: int) -> int:
    """Dynamic shared memory of lora_sgmv_shrink_mma<T, mt, ng> with `warps` warps: each warp's ring of
    MMA_STAGES chunks of (4 mt + 2 ng) 16-byte vectors per lane."""
    return warps * MMA_STAGES * (4 * mt + 2 * ng) * 32 * 16


def bgmv_shrink_smem(threads: int, vec: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of lora_bgmv_shrink: its cp.async staging, for 16-byte vectors only."""
    return SHRINK_STAGE * threads * 16 if vec == wide_vec(dtype) else 0


def bgmv_expand_smem(max_lora_rank: int) -> int:
    """Dynamic shared memory of lora_bgmv_expand: the adapter's max_lora_rank row ids (int32), in whole
    16-byte vectors."""
    return -(-4 * max_lora_rank // 16) * 16


def _all_instances() -> tuple[str, ...]:
    names = []
    for dtype in KERNEL_TYPES:
        for vec in (wide_vec(dtype), 1):
            names.append(kernel_name("bgmv_shrink", dtype, vec))
            names.append(kernel_name("bgmv_expand", dtype, vec))
            names += [kernel_name(op, dtype, vec, GENERIC_ROWS) for op in ("shrink", "expand")]
    for dtype in MMA_TYPES:
        names += [kernel_name("sgmv_shrink_mma", dtype, mt, ng) for mt, ng in MMA_SHRINK_TILES]
        names.append(kernel_name("sgmv_expand_mma", dtype))
    return tuple(names)


# Every instance the wrapper can launch; the nvcc compile test instantiates the same list.
NAME_EXPRESSIONS = _all_instances()
# csrc file -> the template instances that must compile (read by tests/kernels/test_csrc_compile.py).
KERNEL_SOURCES = {SOURCE_PATH.name: NAME_EXPRESSIONS}


@functools.cache
def raw_module():
    """The process-wide module; CuPy compiles it lazily, once per device architecture, and caches the
    binary on disk. The source includes no CUDA header, so NVRTC needs no include path."""
    import cupy

    return cupy.RawModule(
        code=SOURCE_PATH.read_text(), options=COMPILE_OPTIONS, name_expressions=NAME_EXPRESSIONS
    )
