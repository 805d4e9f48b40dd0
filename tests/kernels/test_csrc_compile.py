"""The csrc/ <-> wrapper contract, checked without a GPU.

- Every csrc/*.cu compiles with nvcc for sm_80 and sm_90 as C++14 (CuPy's NVRTC default dialect), with
  each template instance the wrapper can launch instantiated (a generated file includes the source and
  takes each instance's address), so the templates are really compiled. Skipped when nvcc is not on
  the PATH; a compile error (or warning) fails.
- The wrapper passes each kernel exactly as many arguments as its signature has, in the order of the
  signature's names, and rejects bad arguments with ValueErrors naming the sizes, before any launch (run
  here over CPU tensors with launches recorded).
- The sizes the launches depend on are the source's own `#define`s, read from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worker.kernels import cuda, cuda_source
from worker.kernels.pool_args import PoolPart, StepRows
from worker.lora.pool import PAD_ROW

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = ("sm_80", "sm_90")


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def test_every_launched_instance_belongs_to_a_csrc_file():
    assert cuda_source.SOURCE_PATH.parent == CSRC
    assert set(cuda_source.KERNEL_SOURCES) <= {p.name for p in _sources()}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _sources(), ids=lambda p: p.name)
def test_compiles_with_nvcc(source, arch, tmp_path):
    instances = cuda_source.KERNEL_SOURCES.get(source.name, ())
    wrapper = tmp_path / f"instantiate_{source.stem}.cu"
    refs = "".join(f"    reinterpret_cast<const void*>(&{name}),\n" for name in instances)
    wrapper.write_text(f'#include "{source}"\n\nconst void* lora_instances[] = {{\n{refs}    nullptr}};\n')
    cmd = ["nvcc", "-std=c++14", f"-arch={arch}", "-cubin", "--Werror", "all-warnings", str(wrapper)]
    result = subprocess.run(
        [*cmd, "-o", str(tmp_path / "out.cubin")], capture_output=True, text=True, timeout=900
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
    assert cuda_source.source_defines(text) == {"LORA_A": 4, "LORA_B": 6}
    defines = cuda_source.source_defines(cuda_source.SOURCE_PATH.read_text())
    assert defines["LORA_MAX_WARPS"] == defines["LORA_MAX_THREADS"] // 32
    assert (
        cuda_source.SHRINK_STAGE
        == defines["LORA_SHRINK_STAGE"]
        == cuda_source.SHRINK_CHUNKS * (cuda_source.SHRINK_RANK_ROWS + 1)
    )


def _signatures() -> dict[str, list[str]]:
    """Kernel template name -> its parameter names, read from the .cu source."""
    text = cuda_source.SOURCE_PATH.read_text()
    found = re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)", text)
    return {name: [p.split()[-1] for p in params.split(",")] for name, params in found}


def test_every_kernel_reads_the_pool_not_stacks():
    """The stack kernels are gone: every kernel takes a pool view, its row count and a row table."""
    signatures = _signatures()
    assert set(signatures) == {name.split("<")[0] for name in cuda_source.NAME_EXPRESSIONS}
    for name, params in signatures.items():
        view = "a" if "shrink" in name else "b"
        assert params[2:6] == [f"{view}_view", f"{view}_num_rows", f"{view}_rows", "rows_stride"], name
        assert "num_adapters" in params and not any("slot" in p or "stack" in p for p in params), name
    assert "stack" not in cuda_source.SOURCE_PATH.read_text().lower()


class _Recorder(cuda.CudaLoraOps):
    """CudaLoraOps on the CPU with launches recorded instead of run (no CuPy, no device): an H200 (132
    SMs, tensor cores) unless told otherwise; `capturing` plays a CUDA graph capture."""

    def __init__(self, num_sms=132, mma=True, capturing=False):
        self.device = torch.device("cpu")
        self._num_sms = num_sms
        self._target_blocks = 4 * num_sms
        self._mma = mma
        self._init_state()
        self.capturing = capturing
        self.launches = []

    def _capturing(self):
        return self.capturing

    def _stream_handle(self):
        return 0

    def _launch(self, name, grid, block, args, smem=0):
        self.launches.append((name, grid, block, args, smem))


def _site(dtype=torch.bfloat16, n=5, h_in=64, h_outs=(48, 16), r_max=8, use_segments=True):
    """A site over CPU tensors: G = 3 adapters of ranks (0, 8, 4) in each part, rows [0, 1, 1, 2, 2]."""
    i32 = dict(dtype=torch.int32)
    row_adapters = [0, 1, 1, 2, 2][:n] + [2] * max(0, n - 5)
    rows = StepRows.build(row_adapters, (11, 12, 13), use_segments, torch.device("cpu"))
    a_rows = torch.full((3, r_max), PAD_ROW, **i32)
    a_rows[1, :8], a_rows[2, :4] = torch.arange(8), torch.arange(8, 12)
    parts, offset = [], 0
    for k, h_out in enumerate(h_outs):
        parts.append(
            PoolPart(
                key=(0, f"m{k}"),
                b_view=torch.zeros(40, h_out, dtype=dtype),
                a_rows=a_rows,
                b_rows=a_rows.clone(),
                lora_ranks=torch.tensor([0, 8, 4], **i32),
                host_lora_ranks=(0, 8, 4),
                out_offset=offset,
            )
        )
        offset += h_out
    x = torch.zeros(n, h_in, dtype=dtype)
    a_view = torch.zeros(40, h_in, dtype=dtype)
    out = torch.zeros(n, offset + 8, dtype=dtype)
    return x, a_view, parts, rows, out


@pytest.mark.parametrize("use_segments", [False, True], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("mma", [False, True], ids=["generic-sgmv", "mma-sgmv"])
@pytest.mark.parametrize("dtype", list(cuda_source.KERNEL_TYPES), ids=str)
@pytest.mark.parametrize("h_in, h_outs", [(64, (48, 16)), (63, (45, 3))])
def test_wrapper_passes_every_kernel_parameter(dtype, h_in, h_outs, mma, use_segments):
    ops = _Recorder(mma=mma)
    ops.sgmv_mma_min_rows_per_segment = 0 if mma else 8  # 5 rows in 3 segments
    x, a_view, parts, rows, out = _site(dtype, h_in=h_in, h_outs=h_outs, use_segments=use_segments)
    ops.lora_site(x, a_view, parts, rows, out)
    signatures = _signatures()
    # The (64, (48, 16)) site is 16-byte aligned throughout (x, view and out rows, widths, offsets), the
    # (63, (45, 3)) one nowhere.
    vec = 16 // torch.empty((), dtype=dtype).element_size() if h_in == 64 else 1
    if not use_segments:
        pair = [cuda_source.kernel_name(op, dtype, vec) for op in ("bgmv_shrink", "bgmv_expand")]
    elif mma and dtype in cuda_source.MMA_TYPES and vec > 1:  # tensor cores: 16-bit types, 16-byte rows
        pair = [
            cuda_source.kernel_name("sgmv_shrink_mma", dtype, 1, 1),
            cuda_source.kernel_name("sgmv_expand_mma", dtype),
        ]
    else:
        pair = [cuda_source.kernel_name(op, dtype, vec, 4) for op in ("shrink", "expand")]
    assert [launch[0] for launch in ops.launches] == pair * len(h_outs)  # per part, never fused
    y = ops._eager_scratch[0]
    for name, grid, block, args, smem in ops.launches:
        params = signatures[name.split("<")[0]]
        assert name in cuda_source.NAME_EXPRESSIONS
        assert len(args) == len(params), name
        assert all(isinstance(a, int) for a in args), name  # CuPy passes Python ints as 64-bit
        named = dict(zip(params, args, strict=True))
        view = "a" if "shrink" in name else "b"
        assert named[f"{view}_num_rows"] == 40 and named["rows_stride"] == 8 and named["num_adapters"] == 3
        assert named["max_lora_rank"] == 8 and named["num_tokens"] == 5
        assert named["y"] == y.data_ptr() and named["y_stride"] == 8
        assert block[0] * block[1] <= (512 if "sgmv_shrink_mma" in name else 256), block
        assert block[0] % 32 == 0, block
        assert 1 <= grid[1] <= 65535, grid
        if "sgmv_shrink_mma" in name:  # within what the constructor lets these kernels use
            assert (
                smem == cuda_source.mma_shrink_smem(1, 1, block[1]) <= cuda_source.mma_shrink_smem(1, 1, 16)
            )
        elif name.startswith("lora_bgmv_shrink"):  # cp.async staging, under the 48 KiB default
            assert smem == cuda_source.bgmv_shrink_smem(block[0], vec, dtype) <= 48 * 1024
        elif name.startswith("lora_bgmv_expand"):  # the adapter's R_max row ids
            assert smem == 32
        else:
            assert smem == 0, name


def test_parts_are_pointed_at_their_own_tables_and_columns():
    ops = _Recorder()
    x, a_view, parts, rows, out = _site(use_segments=False)
    parts[1] = replace(parts[1], b_rows=parts[1].b_rows.clone(), lora_ranks=parts[1].lora_ranks.clone())
    ops.lora_site(x, a_view, parts, rows, out)
    signatures = _signatures()
    named = [dict(zip(signatures[n.split("<")[0]], a, strict=True)) for n, _, _, a, _ in ops.launches]
    for k, part in enumerate(parts):
        shrink, expand = named[2 * k], named[2 * k + 1]
        assert shrink["a_view"] == a_view.data_ptr() and shrink["a_rows"] == part.a_rows.data_ptr()
        assert expand["b_view"] == part.b_view.data_ptr() and expand["b_rows"] == part.b_rows.data_ptr()
        assert shrink["lora_ranks"] == expand["lora_ranks"] == part.lora_ranks.data_ptr()
        assert expand["out_offset"] == part.out_offset and expand["h_out"] == part.h_out
        assert shrink["row_adapter"] == expand["row_adapter"] == rows.row_adapter.data_ptr()


@pytest.mark.parametrize(
    "n, r_max, h_in, tile, warps, grid",
    [
        (4096, 16, 4096, (2, 2), 8, (128, 1)),  # about a block per SM: 32 x 16 tiles
        (1024, 16, 4096, (1, 1), 16, (64, 2)),  # too few 32-row tiles: 16 x 8 tiles, 16 warps
        (4096, 64, 4096, (2, 2), 8, (128, 4)),
        (64, 8, 576, (1, 1), 9, (4, 1)),  # 9 chunks of 64: a warp each
    ],
)
def test_tensor_core_shrink_tiles(n, r_max, h_in, tile, warps, grid):
    ops = _Recorder()
    x, a_view, parts, rows, out = _site(torch.bfloat16, n=n, h_in=h_in, h_outs=(64,), r_max=r_max)
    ops.lora_site(x, a_view, parts, rows, out)
    name, got_grid, block, _, smem = ops.launches[0]
    assert name == cuda_source.kernel_name("sgmv_shrink_mma", torch.bfloat16, *tile)
    assert (got_grid, block, smem) == (grid, (32, warps), cuda_source.mma_shrink_smem(*tile, warps))


def test_sgmv_takes_tensor_cores_only_for_long_segments_and_16_bit_aligned_rows():
    for mma, dtype, n_rows, h_in, expect in [
        (True, torch.bfloat16, 64, 64, "sgmv_shrink_mma"),
        (True, torch.float16, 64, 64, "sgmv_shrink_mma"),
        (True, torch.float32, 64, 64, "shrink"),  # no fp32 tensor-core kernel
        (False, torch.bfloat16, 64, 64, "shrink"),  # pre-sm_80, or the shared memory was refused
        (True, torch.bfloat16, 23, 64, "shrink"),  # 23 rows in 3 segments: under 8 rows per segment
        (True, torch.bfloat16, 64, 68, "shrink"),  # a pool row of 68 bf16 is 136 bytes: not 16-byte aligned
    ]:
        ops = _Recorder(mma=mma)
        ops.lora_site(*_site(dtype, n=n_rows, h_in=h_in, h_outs=(64,)))
        assert ops.launches[0][0].startswith(f"lora_{expect}<"), (mma, dtype, n_rows, h_in)


def test_a_misaligned_view_takes_one_element_accesses():
    """The view's storage must be 16-byte aligned for 16-byte accesses to every row (row j at j * w)."""
    ops = _Recorder()
    x, a_view, parts, rows, out = _site(torch.bfloat16, use_segments=False, h_outs=(64,))
    storage = torch.zeros(41 * 64 + 1, dtype=torch.bfloat16)
    a_view = storage[1 : 1 + 40 * 64].view(40, 64)  # 2 bytes past an aligned start
    ops.lora_site(x, a_view, parts, rows, out)
    assert [n for n, *_ in ops.launches] == [
        cuda_source.kernel_name("bgmv_shrink", torch.bfloat16, 1),
        cuda_source.kernel_name("bgmv_expand", torch.bfloat16, 8),
    ]


@pytest.mark.parametrize("use_segments", [False, True], ids=["bgmv", "sgmv"])
def test_shapes_alone_choose_the_launch_under_capture(use_segments):
    """Under CUDA graph capture: same shapes, other adapters and ranks (all 0 even): the same launches
    (what replay with new tables needs), on a scratch of the graph's own."""
    first, second = _Recorder(capturing=True), _Recorder(capturing=True)
    x, a_view, parts, rows, out = _site(use_segments=use_segments)
    first.lora_site(x, a_view, parts, rows, out)
    none = StepRows.build([-1] * 5, (11, 12, 13), use_segments, torch.device("cpu"))
    none = replace(none, segment_indptr=rows.segment_indptr, segment_adapters=rows.segment_adapters)
    none = replace(none, host_indptr=rows.host_indptr, host_segment_adapters=(-1,) * 3)
    zero = [replace(p, host_lora_ranks=(0, 0, 0)) for p in parts]
    second.lora_site(x, a_view, zero, none, out)
    assert [(n, g, b, m) for n, g, b, _, m in first.launches] == [
        (n, g, b, m) for n, g, b, _, m in second.launches
    ]
    assert len(first.launches) == 4 and not first._eager_scratch
    assert list(first._graph_scratch) == [(0, 5, 8)]


def test_eager_calls_skip_parts_no_adapter_of_the_step_targets():
    ops = _Recorder()
    x, a_view, parts, rows, out = _site(use_segments=False)
    parts[1] = replace(parts[1], host_lora_ranks=(5, 0, 0))  # only adapter 0 targets it; no row uses 0
    rows = StepRows.build([1, 2, -1, 2, 1], (11, 12, 13), False, torch.device("cpu"))
    ops.lora_site(x, a_view, parts, rows, out)
    assert len(ops.launches) == 2  # part 0 only
    ops.launches.clear()
    none = StepRows.build([-1] * 5, (11, 12, 13), True, torch.device("cpu"))
    ops.lora_site(x, a_view, parts, none, out)
    assert ops.launches == []


def test_eager_scratch_grows_and_is_reused():
    ops = _Recorder()
    ops.lora_site(*_site(n=5, use_segments=False))
    first = ops._eager_scratch[0]
    ops.lora_site(*_site(n=3, use_segments=False))
    assert ops._eager_scratch[0] is first  # 3 x 8 fits in 5 x 8: no allocation
    ops.lora_site(*_site(n=9, use_segments=False))
    assert ops._eager_scratch[0].numel() >= 9 * 8 and not ops._graph_scratch


def test_empty_batches_launch_nothing():
    ops = _Recorder(capturing=True)
    x, a_view, parts, _, out = _site(n=0)
    rows = StepRows.build([], (11, 12, 13), True, torch.device("cpu"))
    ops.lora_site(x, a_view, parts, rows, out)
    rows = replace(rows, use_segments=False)
    ops.lora_site(x, a_view, parts, rows, out)
    x, a_view, parts, rows, out = _site()
    ops.lora_site(x, a_view, [], rows, out)  # no parts
    empty = [replace(p, a_rows=p.a_rows[:, :0], b_rows=p.b_rows[:, :0]) for p in parts]  # R_max == 0
    ops.lora_site(x, a_view, empty, rows, out)
    assert ops.launches == []


def _bad(change):
    x, a_view, parts, rows, out = _site()
    site = dict(x=x, a_view=a_view, parts=parts, rows=rows, out=out)
    return {**site, **change(site)}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: dict(x=s["x"].float()), r"a_view must be a 2-d torch.float32 tensor"),
        (lambda s: dict(x=s["x"].double()), r"x must be a 2-d torch.bfloat16 or"),
        (lambda s: dict(a_view=s["a_view"][:, :60]), r"a_view must be contiguous"),
        (lambda s: dict(a_view=torch.zeros(40, 60, dtype=torch.bfloat16)), r"a_view \(40, 60\)"),
        (lambda s: dict(out=s["out"][:4]), r"out \(4, 72\) \(expected a_view \[num_rows, 64\] and out \[5,"),
        (
            lambda s: dict(rows=replace(s["rows"], row_adapter=s["rows"].row_adapter[:4])),
            r"rows.row_adapter has shape \(4,\), expected \(5,\)",
        ),
        (
            lambda s: dict(rows=replace(s["rows"], segment_adapters=s["rows"].segment_adapters.long())),
            r"rows.segment_adapters must be a 1-d torch.int32",
        ),
        (
            lambda s: dict(rows=replace(s["rows"], adapters=(1, 2))),
            r"\(0, 'm0'\): a_rows has shape \(3, 8\), expected \(2, 8\)",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][0], b_rows=s["parts"][0].b_rows[:, :4])]),
            r"b_rows has shape \(3, 4\), expected \(3, 8\) \(the shape of a_rows\)",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][0], lora_ranks=s["parts"][0].lora_ranks[:2])]),
            r"lora_ranks has shape \(2,\), expected \(3,\)",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][0], host_lora_ranks=(0, 1))]),
            r"host_lora_ranks has 2 entries, expected 3",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][1], out_offset=60)]),
            r"\(0, 'm1'\): columns \[60, 76\) are not within out's 72",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][0], b_view=s["parts"][0].b_view.half())]),
            r"b_view must be a 2-d torch.bfloat16",
        ),
        (
            lambda s: dict(parts=[replace(s["parts"][0], a_rows=s["parts"][0].a_rows.T.contiguous().T)]),
            r"a_rows must be contiguous in its last dimension",
        ),
    ],
)
def test_bad_arguments_name_the_sizes_before_any_launch(change, message):
    ops = _Recorder()
    with pytest.raises(ValueError, match=message):
        ops.lora_site(**_bad(change))
    assert ops.launches == []
