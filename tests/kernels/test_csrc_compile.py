"""The csrc/ <-> wrapper contract, checked without a GPU.

- Every csrc/*.cu compiles with nvcc for sm_80 and sm_90 as C++14 (CuPy's NVRTC default dialect), with
  each template instance the wrapper can launch instantiated (a generated file includes the source and
  takes each instance's address), so the templates are really compiled. Skipped when nvcc is not on
  the PATH; a compile error (or warning) fails.
- The wrapper passes each kernel exactly as many arguments as its signature has, and rejects bad
  arguments with ValueErrors naming the sizes, before any launch (run here with launches recorded).
- The sizes the launches depend on are the source's own `#define`s, read from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from worker.kernels import cuda

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = ("sm_80", "sm_90")


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def test_every_launched_instance_belongs_to_a_csrc_file():
    assert cuda.SOURCE_PATH.parent == CSRC
    assert set(cuda.KERNEL_SOURCES) <= {p.name for p in _sources()}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _sources(), ids=lambda p: p.name)
def test_compiles_with_nvcc(source, arch, tmp_path):
    instances = cuda.KERNEL_SOURCES.get(source.name, ())
    wrapper = tmp_path / f"instantiate_{source.stem}.cu"
    refs = "".join(f"    reinterpret_cast<const void*>(&{name}),\n" for name in instances)
    wrapper.write_text(f'#include "{source}"\n\nconst void* lora_instances[] = {{\n{refs}    nullptr}};\n')
    cmd = ["nvcc", "-std=c++14", f"-arch={arch}", "-cubin", "--Werror", "all-warnings", str(wrapper)]
    result = subprocess.run(
        [*cmd, "-o", str(tmp_path / "out.cubin")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def test_defines_are_read_from_the_source():
    text = (
        "#define LORA_GUARD\n"
        "#define LORA_A 4  // rows\n"
        "#define LORA_B (LORA_A * (LORA_A + 1) / 3)\n"
        "#define LORA_EPS 1e-6f\n"
        "#define LORA_F(x) (2 * x)\n"
    )
    assert cuda.source_defines(text) == {"LORA_A": 4, "LORA_B": 6}
    defines = cuda.source_defines(cuda.SOURCE_PATH.read_text())
    assert defines["LORA_MAX_WARPS"] == defines["LORA_MAX_THREADS"] // 32
    assert (
        cuda.SHRINK_STAGE == defines["LORA_SHRINK_STAGE"] == cuda.SHRINK_CHUNKS * (cuda.SHRINK_RANK_ROWS + 1)
    )


def _parameter_counts() -> dict[str, int]:
    """Kernel template name -> number of parameters, read from the .cu source."""
    text = cuda.SOURCE_PATH.read_text()
    signatures = re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)", text)
    return {name: len(params.split(",")) for name, params in signatures}


class _Recorder(cuda.CudaLoraOps):
    """CudaLoraOps on the CPU with launches recorded instead of run (no CuPy, no device): an H200 (132
    SMs, tensor cores) unless told otherwise."""

    def __init__(self, num_sms=132, mma=True):
        self.device = torch.device("cpu")
        self._num_sms = num_sms
        self._target_blocks = 4 * num_sms
        self._mma = mma
        self.launches = []

    def _launch(self, name, grid, block, args, smem=0):
        self.launches.append((name, grid, block, args, smem))


def _problem(dtype=torch.bfloat16, n=5, h_in=64, h_out=48, max_lora_rank=8, num_slots=3):
    i32 = dict(dtype=torch.int32)
    return dict(
        x=torch.zeros(n, h_in, dtype=dtype),
        lora_a_stack=torch.zeros(num_slots, max_lora_rank, h_in, dtype=dtype),
        lora_b_stack=torch.zeros(num_slots, max_lora_rank, h_out, dtype=dtype),
        lora_ranks=torch.tensor([0, 8, 4][:num_slots], **i32),
        slot_ids=torch.zeros(n, **i32),
        segment_indptr=torch.tensor([0, 2, n], **i32),
        segment_slot_ids=torch.tensor([1, 2], **i32),
        y=torch.zeros(n, max_lora_rank),
        out=torch.zeros(n, h_out + 16, dtype=dtype),
    )


def _call_all(ops, p, out_offset=8):
    segments = (p["segment_indptr"], p["segment_slot_ids"])
    ops.bgmv_shrink(p["x"], p["lora_a_stack"], p["slot_ids"], p["lora_ranks"], p["y"])
    ops.bgmv_expand(p["y"], p["lora_b_stack"], p["slot_ids"], p["lora_ranks"], p["out"], out_offset)
    ops.sgmv_shrink(p["x"], p["lora_a_stack"], *segments, p["lora_ranks"], p["y"])
    ops.sgmv_expand(p["y"], p["lora_b_stack"], *segments, p["lora_ranks"], p["out"], out_offset)


@pytest.mark.parametrize("mma", [False, True], ids=["generic-sgmv", "mma-sgmv"])
@pytest.mark.parametrize("dtype", list(cuda.KERNEL_TYPES), ids=str)
@pytest.mark.parametrize("h_in, h_out, out_offset", [(64, 48, 8), (63, 45, 3)])
def test_wrapper_passes_every_kernel_parameter(dtype, h_in, h_out, out_offset, mma):
    ops = _Recorder(mma=mma)
    ops.sgmv_mma_min_rows_per_segment = 0 if mma else 8  # 5 rows in 2 segments
    _call_all(ops, _problem(dtype, h_in=h_in, h_out=h_out), out_offset)
    counts = _parameter_counts()
    vec = 16 // torch.empty((), dtype=dtype).element_size() if h_in == 64 else 1  # 16-byte or 1-element
    sgmv = [cuda.kernel_name(op, dtype, vec, 4) for op in ("shrink", "expand")]
    if mma and dtype in cuda.MMA_TYPES and vec > 1:  # tensor cores: 16-bit types, 16-byte rows only
        sgmv = [cuda.kernel_name("sgmv_shrink_mma", dtype, 1, 1), cuda.kernel_name("sgmv_expand_mma", dtype)]
    bgmv = [cuda.kernel_name("bgmv_shrink", dtype, vec), cuda.kernel_name("bgmv_expand", dtype, vec)]
    assert [launch[0] for launch in ops.launches] == [*bgmv, *sgmv]
    for name, grid, block, args, smem in ops.launches:
        assert name in cuda.NAME_EXPRESSIONS
        assert len(args) == counts[name.split("<")[0]], name
        assert all(isinstance(a, int) for a in args), name  # CuPy passes Python ints as 64-bit
        assert block[0] * block[1] <= (512 if "sgmv_shrink_mma" in name else 256), block
        assert block[0] % 32 == 0, block
        assert 1 <= grid[1] <= 65535, grid
        if "sgmv_shrink_mma" in name:  # within what the constructor lets these kernels use
            assert smem == cuda.mma_shrink_smem(1, 1, block[1]) <= cuda.mma_shrink_smem(1, 1, 16)
        elif name.startswith("lora_bgmv_shrink") and vec > 1:  # cp.async staging, under the 48 KiB default
            assert smem == cuda.SHRINK_STAGE * block[0] * 16 <= 48 * 1024
        else:
            assert smem == 0, name


@pytest.mark.parametrize(
    "n, max_lora_rank, h_in, tile, warps, grid",
    [
        (4096, 16, 4096, (2, 2), 8, (128, 1)),  # about a block per SM: 32 x 16 tiles
        (1024, 16, 4096, (1, 1), 16, (64, 2)),  # too few 32-row tiles: 16 x 8 tiles, 16 warps
        (4096, 64, 4096, (2, 2), 8, (128, 4)),
        (64, 8, 576, (1, 1), 9, (4, 1)),  # 9 chunks of 64: a warp each
    ],
)
def test_tensor_core_shrink_tiles(n, max_lora_rank, h_in, tile, warps, grid):
    ops = _Recorder()
    p = _problem(torch.bfloat16, n=n, h_in=h_in, max_lora_rank=max_lora_rank)
    p["segment_indptr"] = torch.tensor([0, n // 2, n], dtype=torch.int32)
    ops.sgmv_shrink(
        p["x"], p["lora_a_stack"], p["segment_indptr"], p["segment_slot_ids"], p["lora_ranks"], p["y"]
    )
    ((name, got_grid, block, _, smem),) = ops.launches
    assert name == cuda.kernel_name("sgmv_shrink_mma", torch.bfloat16, *tile)
    assert (got_grid, block, smem) == (grid, (32, warps), cuda.mma_shrink_smem(*tile, warps))


def test_sgmv_takes_tensor_cores_only_for_long_segments_and_16_bit_types():
    p = _problem(torch.bfloat16, n=64)
    p["segment_indptr"] = torch.tensor([0, 30, 64], dtype=torch.int32)  # 32 rows per segment on average
    segments = (p["segment_indptr"], p["segment_slot_ids"])
    for mma, dtype, n_rows, expect in [
        (True, torch.bfloat16, 64, "sgmv_shrink_mma"),
        (True, torch.float16, 64, "sgmv_shrink_mma"),
        (True, torch.float32, 64, "shrink"),  # no fp32 tensor-core kernel
        (False, torch.bfloat16, 64, "shrink"),  # pre-sm_80, or the shared memory was refused
        (True, torch.bfloat16, 15, "shrink"),  # 15 rows in 2 segments: under 8 rows per segment
    ]:
        ops = _Recorder(mma=mma)
        x = torch.zeros(n_rows, 64, dtype=dtype)
        a = torch.zeros(3, 8, 64, dtype=dtype)
        indptr = segments[0].clamp(max=n_rows)
        ops.sgmv_shrink(x, a, indptr, segments[1], p["lora_ranks"], torch.zeros(n_rows, 8))
        assert ops.launches[0][0].startswith(f"lora_{expect}<"), (mma, dtype, n_rows)


def test_shapes_alone_choose_the_launch():
    """Same shapes, other slot ids and ranks: the same launches (what CUDA graph replay needs)."""
    first, second = _Recorder(), _Recorder()
    p = _problem()
    _call_all(first, p)
    p["slot_ids"].fill_(2)
    p["lora_ranks"].zero_()
    _call_all(second, p)
    assert [(n, g, b, m) for n, g, b, _, m in first.launches] == [
        (n, g, b, m) for n, g, b, _, m in second.launches
    ]


def test_empty_batches_launch_nothing():
    ops = _Recorder()
    p = _problem(n=0)
    p["segment_indptr"] = torch.zeros(1, dtype=torch.int32)
    p["segment_slot_ids"] = torch.zeros(0, dtype=torch.int32)
    _call_all(ops, p)
    assert ops.launches == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(5, 64)), r"lora_a_stack must be a 3-d torch.float32 tensor"),
        (dict(x=torch.zeros(5, 64, dtype=torch.float64)), r"x must be a 2-d torch.bfloat16 or"),
        (dict(slot_ids=torch.zeros(4, dtype=torch.int32)), r"slot_ids has 4 entries, expected 5"),
        (dict(slot_ids=torch.zeros(5, dtype=torch.int64)), r"slot_ids must be a 1-d torch.int32"),
        (dict(lora_ranks=torch.zeros(2, dtype=torch.int32)), r"lora_ranks has 2 entries, expected 3"),
        (dict(y=torch.zeros(5, 4)), r"y \(5, 4\) \(expected y \[5, 8\]\)"),
        (dict(y=torch.zeros(5, 8, dtype=torch.bfloat16)), r"y must be a 2-d torch.float32"),
        (
            dict(lora_a_stack=torch.zeros(3, 64, 8, dtype=torch.bfloat16).transpose(1, 2)),
            "must be contiguous",
        ),
        (
            dict(lora_a_stack=torch.zeros(3, 8, 60, dtype=torch.bfloat16)),
            r"x \(5, 64\), lora_a_stack \(3, 8, 60\)",
        ),
    ],
)
def test_bad_shrink_arguments_name_the_sizes(change, message):
    p = {**_problem(), **change}
    with pytest.raises(ValueError, match=message):
        _Recorder().bgmv_shrink(p["x"], p["lora_a_stack"], p["slot_ids"], p["lora_ranks"], p["y"])


def test_bad_expand_arguments_name_the_sizes():
    p, ops = _problem(), _Recorder()
    with pytest.raises(ValueError, match=r"columns \[20, 68\) within out's 64"):
        ops.bgmv_expand(p["y"], p["lora_b_stack"], p["slot_ids"], p["lora_ranks"], p["out"], 20)
    with pytest.raises(ValueError, match=r"segment_indptr has 2 entries, expected 3 \(num_segments \+ 1\)"):
        indptr = p["segment_indptr"][:2]
        ops.sgmv_expand(p["y"], p["lora_b_stack"], indptr, p["segment_slot_ids"], p["lora_ranks"], p["out"])
    with pytest.raises(ValueError, match="lora_b_stack must be a 3-d torch.float16"):
        ops.bgmv_expand(p["y"], p["lora_b_stack"], p["slot_ids"], p["lora_ranks"], p["out"].half())
