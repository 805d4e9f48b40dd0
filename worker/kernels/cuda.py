"""CUDA implementation of the LoRA gather-matmul ops: `csrc/lora_gather_matmul.cu`, compiled by CuPy.

Semantics, layouts and argument names are those of `reference.py` (the spec); the `.cu` header states
the launch shapes. What this wrapper adds:

- Compilation once per process: one `cupy.RawModule` (NVRTC) holds every template instance, named by
  `NAME_EXPRESSIONS`; CuPy compiles it for the architecture of the device current at first use (we
  make that the ops' device), keeps the loaded module per device, and caches the binary on disk. The
  source includes no CUDA header, so NVRTC needs no include path.
- Zero copy: kernels get the tensors' device pointers (`data_ptr()`, the address DLPack and
  `__cuda_array_interface__` would hand over too, without creating an array object per call) and run
  on torch's current stream, so they order with torch's work and are captured by `torch.cuda.graph`.
- No allocation per call, and launch grids that depend on shapes only (never on slot or rank values),
  so a captured graph replays correctly with new slot ids and ranks in the same buffers.
- dtypes: x and the stacks share the model dtype, bfloat16 or float16 (float32 works too, at twice the
  bytes; the tiny test models run in it). y is always float32.
- Index values are not checked on the host (that would synchronise): a slot id outside the stack or a
  row past the last segment is skipped on the device, and a rank is clamped to max_lora_rank.
- Kernel choice (shapes only): bgmv takes lora_bgmv_shrink / lora_bgmv_expand; sgmv takes the
  tensor-core kernels (lora_sgmv_*_mma) for bfloat16 / float16 with 16-byte aligned rows on sm_80+ when
  the batch averages at least `sgmv_mma_min_rows_per_segment` rows per segment, else the generic
  lora_shrink / lora_expand. The tensor-core shrink streams through a per-warp cp.async ring of about
  144 KiB of dynamic shared memory per block; the constructor raises the kernels' limit for it (once,
  before any graph capture) and falls back to the generic sgmv kernels if the device refuses.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
import warnings
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
_MAX_THREADS = _DEFINES["LORA_MAX_THREADS"]  # the kernels size their shared memory for it
_MAX_GRID_X, _MAX_GRID_Y = 2**31 - 1, 65535
# The wrapper's own launch choices, which the kernels take as template arguments or block shapes.
GENERIC_ROWS = 4  # rows of x fused per block by the generic lora_shrink / lora_expand (sgmv fallback)
MMA_EXPAND_WARPS = 4  # warps per lora_sgmv_expand_mma block (16 rows, MMA_COLS columns per warp)


def _wide_vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte access."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def kernel_name(kernel: str, dtype: torch.dtype, *params: int) -> str:
    """The name expression of one template instance, e.g. 'lora_bgmv_shrink<Bf16, 8, 2>'."""
    return f"lora_{kernel}<{', '.join([KERNEL_TYPES[dtype], *map(str, params)])}>"


def mma_shrink_smem(mt: int, ng: int, warps: int) -> int:
    """Dynamic shared memory of lora_sgmv_shrink_mma<T, mt, ng> with `warps` warps: each warp's ring of
    MMA_STAGES chunks of (4 mt + 2 ng) 16-byte vectors per lane."""
    return warps * MMA_STAGES * (4 * mt + 2 * ng) * 32 * 16


def _all_instances() -> tuple[str, ...]:
    names = []
    for dtype in KERNEL_TYPES:
        for vec in (_wide_vec(dtype), 1):
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
def _raw_module():
    """The process-wide module; CuPy compiles it lazily, once per device architecture."""
    import cupy

    return cupy.RawModule(
        code=SOURCE_PATH.read_text(), options=COMPILE_OPTIONS, name_expressions=NAME_EXPRESSIONS
    )


def _vec(dtype: torch.dtype, sizes: tuple[int, ...], tensors: tuple[torch.Tensor, ...]) -> int:
    """16-byte accesses when every size (in elements) and pointer allows them, else one element."""
    vec = _wide_vec(dtype)
    if any(n % vec for n in sizes) or any(t.data_ptr() % 16 for t in tensors):
        return 1
    return vec


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check(op: str, name: str, t, dtype, ndim: int, device: torch.device, contiguous: bool) -> None:
    """Raise ValueError unless t is a tensor of that dtype (None: any kernel dtype), rank and device,
    with a contiguous last dim (or fully contiguous when `contiguous`)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtype_ok = t.dtype in KERNEL_TYPES if dtype is None else t.dtype == dtype
    if t.dim() != ndim or not dtype_ok or t.device != device:
        want = " or ".join(map(str, KERNEL_TYPES)) if dtype is None else str(dtype)
        raise ValueError(
            f"{op}: {name} must be a {ndim}-d {want} tensor on {device}, "
            f"got shape {tuple(t.shape)} {t.dtype} on {t.device}"
        )
    ok = t.is_contiguous() if contiguous else (t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1)
    if not ok:
        kind = "contiguous" if contiguous else "contiguous in its last dimension"
        raise ValueError(f"{op}: {name} must be {kind}, got shape {tuple(t.shape)} stride {t.stride()}")


def _check_len(op: str, name: str, t: torch.Tensor, n: int, what: str) -> None:
    if t.shape[0] != n:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries, expected {n} ({what})")


class CudaLoraOps:
    """The four punica ops as CUDA kernels on one device (see the module docstring)."""

    # bgmv handles any slot order at full speed, so decode batches need no sorting into segments.
    decode_uses_segments = False
    # Separate q/k/v (gate/up) stacks: fusing would make expand read block-diagonal zeros.
    fuse_sub_modules = False

    # sgmv batches average at least this many rows per segment to take the tensor-core kernels (each
    # (row tile, segment) pair re-reads the slot's weights; shorter segments go to the generic kernels).
    sgmv_mma_min_rows_per_segment = 8

    def __init__(self, device: torch.device | str):
        import cupy

        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaLoraOps needs a CUDA device, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._cupy = cupy
        self._cupy_device = cupy.cuda.Device(index)
        self._streams: dict[int, object] = {}
        props = torch.cuda.get_device_properties(index)
        self._num_sms = props.multi_processor_count
        # Enough resident blocks to keep every SM's loads in flight (a shape-only launch heuristic).
        self._target_blocks = 4 * self._num_sms
        self._mma = props.major >= 8  # mma.sync with bf16 / f16 / tf32 operands
        module = _raw_module()
        with self._cupy_device:  # compile for, and load on, this device
            raw = {name: module.get_function(name) for name in NAME_EXPRESSIONS}
            self._kernels = {name: kernel.kernel for name, kernel in raw.items()}
            if self._mma:
                self._mma = self._allow_mma_shrink_smem(raw)
        # One launch with no rows: creates CuPy's per-thread context state now, not under graph capture.
        self._launch(kernel_name("shrink", torch.float32, 1, GENERIC_ROWS), (1, 1), (32, 1), (0,) * 14)

    @staticmethod
    def _allow_mma_shrink_smem(raw: dict) -> bool:
        """Let the tensor-core shrink kernels use their rings (over the default 48 KiB of dynamic shared
        memory); False, and no tensor-core sgmv, if the device refuses."""
        try:
            for dtype in MMA_TYPES:
                for (mt, ng), warps in MMA_SHRINK_TILES.items():
                    kernel = raw[kernel_name("sgmv_shrink_mma", dtype, mt, ng)]
                    need = mma_shrink_smem(mt, ng, warps)
                    kernel.max_dynamic_shared_size_bytes = need
                    if kernel.max_dynamic_shared_size_bytes < need:
                        return False
        except Exception as exc:  # an old driver or CuPy: the generic kernels still cover sgmv
            warnings.warn(f"CudaLoraOps: no tensor-core sgmv ({type(exc).__name__}: {exc})", stacklevel=2)
            return False
        return True

    def stack_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The model dtype: the kernels read x and the stacks in one 16- or 32-bit float type."""
        if model_dtype not in KERNEL_TYPES:
            raise ValueError(f"CudaLoraOps supports {list(KERNEL_TYPES)} models, got {model_dtype}")
        return model_dtype

    def row_order(self, slots: list[int], slot_lora_ranks: dict[int, int]) -> list[int]:
        """Sequences grouped by adapter slot (stable): each adapter's prompt rows form one sgmv segment.
        bgmv takes rows in any order and the kernels handle mixed ranks, so ranks play no part."""
        return sorted(range(len(slots)), key=slots.__getitem__)

    def bgmv_shrink(self, x, lora_a_stack, slot_ids, lora_ranks, y) -> None:
        """Semantics: y[i, :r] = x[i] @ lora_a_stack[s, :r].T  where s = slot_ids[i], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype (rows may be strided). lora_a_stack: [num_slots, max_lora_rank,
        h_in] same dtype, contiguous. slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32
        (0 = row skipped). y: [num_tokens, max_lora_rank] float32, changed in place in columns < r only.
        """
        self._shrink("bgmv_shrink", x, lora_a_stack, slot_ids, None, None, lora_ranks, y)

    def bgmv_expand(self, y, lora_b_stack, slot_ids, lora_ranks, out, out_offset: int = 0) -> None:
        """Semantics: out[i, o:o+h_out] += y[i, :r] @ lora_b_stack[s, :r]  with s = slot_ids[i],
        r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_lora_rank] float32. lora_b_stack: [num_slots, max_lora_rank, h_out] model dtype,
        contiguous. slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32 (0 = row untouched).
        out: [num_tokens, h_total] model dtype (rows may be strided), changed in place in columns
        [o, o + h_out) of rows with an adapter (float32 sum, rounded once).
        """
        self._expand("bgmv_expand", y, lora_b_stack, slot_ids, None, None, lora_ranks, out, out_offset)

    def sgmv_shrink(self, x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y) -> None:
        """Semantics: y[p:q, :r] = x[p:q] @ lora_a_stack[s, :r].T  for each segment g with rows
        [p, q) = segment_indptr[g:g+2], s = segment_slot_ids[g], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype. lora_a_stack: [num_slots, max_lora_rank, h_in] same dtype.
        segment_indptr: [num_segments + 1] int32 (non-decreasing, from 0; segments may be empty).
        segment_slot_ids: [num_segments] int32. lora_ranks: [num_slots] int32.
        y: [num_tokens, max_lora_rank] float32, changed in place in columns < r of each segment's rows.
        """
        self._shrink("sgmv_shrink", x, lora_a_stack, None, segment_indptr, segment_slot_ids, lora_ranks, y)

    def sgmv_expand(
        self, y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset: int = 0
    ) -> None:
        """Semantics: out[p:q, o:o+h_out] += y[p:q, :r] @ lora_b_stack[s, :r]  for each segment g with
        rows [p, q), s = segment_slot_ids[g], r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_lora_rank] float32. lora_b_stack: [num_slots, max_lora_rank, h_out] model dtype.
        segment_indptr: [num_segments + 1] int32. segment_slot_ids: [num_segments] int32.
        out: [num_tokens, h_total] model dtype, changed in place (float32 sum, rounded once).
        """
        self._expand(
            "sgmv_expand",
            y,
            lora_b_stack,
            None,
            segment_indptr,
            segment_slot_ids,
            lora_ranks,
            out,
            out_offset,
        )

    def sgmv_lora(
        self,
        x,
        lora_a_stack,
        lora_b_stack,
        segment_indptr,
        segment_slot_ids,
        lora_ranks,
        y,
        out,
        out_offset: int = 0,
    ) -> None:
        """Semantics: sgmv_shrink into the scratch y, then sgmv_expand from it (two launches)."""
        self.sgmv_shrink(x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y)
        self.sgmv_expand(y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset)

    def _shrink(self, op, x, lora_a_stack, slot_ids, segment_indptr, segment_slot_ids, lora_ranks, y):
        dev = self.device
        _check(op, "x", x, None, 2, dev, False)
        _check(op, "lora_a_stack", lora_a_stack, x.dtype, 3, dev, True)
        _check(op, "y", y, torch.float32, 2, dev, False)
        num_tokens, h_in = x.shape
        num_slots, max_lora_rank, a_h_in = lora_a_stack.shape
        if a_h_in != h_in or tuple(y.shape) != (num_tokens, max_lora_rank):
            raise ValueError(
                f"{op}: sizes disagree: x {tuple(x.shape)}, lora_a_stack {tuple(lora_a_stack.shape)}, "
                f"y {tuple(y.shape)} (expected y [{num_tokens}, {max_lora_rank}])"
            )
        num_segments = self._check_indices(
            op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
        )
        if num_tokens == 0 or max_lora_rank == 0 or (slot_ids is None and num_segments == 0):
            return
        vec = _vec(x.dtype, (h_in, x.stride(0)), (x, lora_a_stack))
        n_vec = h_in // vec
        head = (x.data_ptr(), x.stride(0), lora_a_stack.data_ptr())
        tail = (lora_ranks.data_ptr(), num_slots, y.data_ptr(), y.stride(0), num_tokens, h_in, max_lora_rank)
        sizes = f"num_tokens={num_tokens}, max_lora_rank={max_lora_rank}"
        if slot_ids is not None:
            # One row per block, 4 rank rows; each thread loads 2 vectors of x and of each rank row at once.
            threads = min(_MAX_THREADS, max(32, _pow2_at_least(-(-n_vec // SHRINK_CHUNKS))))
            grid = (num_tokens, min(-(-max_lora_rank // SHRINK_RANK_ROWS), _MAX_GRID_Y))
            self._check_grid(op, grid, sizes)
            args = (*head, slot_ids.data_ptr(), *tail)
            smem = SHRINK_STAGE * threads * 16 if vec == _wide_vec(x.dtype) else 0  # cp.async staging
            self._launch(kernel_name("bgmv_shrink", x.dtype, vec), grid, (threads, 1), args, smem)
            return
        segments = (segment_indptr.data_ptr(), segment_slot_ids.data_ptr(), num_segments)
        if self._use_mma(x.dtype, vec, num_tokens, num_segments):
            # Tiles of 32 rows x 16 ranks when they alone give about a block per SM, else 16 x 8.
            big = -(-num_tokens // 32) * -(-max_lora_rank // 16) * 10 >= 9 * self._num_sms
            mt, ng = (2, 2) if big else (1, 1)
            warps = min(MMA_SHRINK_TILES[(mt, ng)], -(-h_in // MMA_K))  # warps split h_in's chunks
            grid = (-(-num_tokens // (16 * mt)), min(-(-max_lora_rank // (8 * ng)), _MAX_GRID_Y))
            self._check_grid(op, grid, sizes)
            name = kernel_name("sgmv_shrink_mma", x.dtype, mt, ng)
            smem = mma_shrink_smem(mt, ng, warps)
            self._launch(name, grid, (32, warps), (*head, *segments, *tail), smem)
            return
        # Generic kernel: threads of one rank row split h_in, about 4 vectors each; the rest of the block
        # takes more rank rows. Few tokens: one block per rank tile; many: blocks loop over tiles.
        threads_per_row = min(_MAX_THREADS, max(32, _pow2_at_least(-(-n_vec // 4))))
        rank_rows = min(_MAX_THREADS // threads_per_row, max_lora_rank)
        num_groups, num_tiles = -(-num_tokens // GENERIC_ROWS), -(-max_lora_rank // rank_rows)
        grid = (num_groups, min(num_tiles, max(1, -(-self._target_blocks // num_groups))))
        self._check_grid(op, grid, sizes)
        args = (*head, 0, *segments, *tail)
        name = kernel_name("shrink", x.dtype, vec, GENERIC_ROWS)
        self._launch(name, grid, (threads_per_row, rank_rows), args)

    def _expand(
        self, op, y, lora_b_stack, slot_ids, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset
    ):
        dev = self.device
        _check(op, "out", out, None, 2, dev, False)
        _check(op, "lora_b_stack", lora_b_stack, out.dtype, 3, dev, True)
        _check(op, "y", y, torch.float32, 2, dev, False)
        num_tokens, h_total = out.shape
        num_slots, max_lora_rank, h_out = lora_b_stack.shape
        out_offset = int(out_offset)
        if tuple(y.shape) != (num_tokens, max_lora_rank) or not 0 <= out_offset <= h_total - h_out:
            raise ValueError(
                f"{op}: sizes disagree: y {tuple(y.shape)}, lora_b_stack {tuple(lora_b_stack.shape)}, "
                f"out {tuple(out.shape)}, out_offset {out_offset} (expected y [{num_tokens}, "
                f"{max_lora_rank}] and columns [{out_offset}, {out_offset + h_out}) within out's {h_total})"
            )
        num_segments = self._check_indices(
            op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
        )
        if num_tokens == 0 or max_lora_rank == 0 or h_out == 0 or (slot_ids is None and num_segments == 0):
            return
        vec = _vec(out.dtype, (h_out, out.stride(0), out_offset), (out, lora_b_stack))
        n_vec = h_out // vec
        head = (y.data_ptr(), y.stride(0), lora_b_stack.data_ptr())
        tail = (
            lora_ranks.data_ptr(),
            num_slots,
            out.data_ptr(),
            out.stride(0),
            out_offset,
            num_tokens,
            h_out,
            max_lora_rank,
        )
        sizes = f"num_tokens={num_tokens}, h_out={h_out}"
        # The rank is split over threadIdx.y so that each thread has at most 8 rows of B in flight at once.
        rank_splits = min(_MAX_THREADS // 32, max(1, -(-max_lora_rank // EXPAND_ROWS_IN_FLIGHT)))
        if slot_ids is not None:
            threads = 64 if n_vec > 32 and 64 * rank_splits <= _MAX_THREADS else 32
            grid = (num_tokens, -(-n_vec // threads))
            self._check_grid(op, grid, sizes)
            args = (*head, slot_ids.data_ptr(), *tail)
            self._launch(kernel_name("bgmv_expand", out.dtype, vec), grid, (threads, rank_splits), args)
            return
        segments = (segment_indptr.data_ptr(), segment_slot_ids.data_ptr(), num_segments)
        if self._use_mma(out.dtype, vec, num_tokens, num_segments):
            grid = (-(-num_tokens // 16), -(-h_out // (MMA_COLS * MMA_EXPAND_WARPS)))
            self._check_grid(op, grid, sizes)
            name = kernel_name("sgmv_expand_mma", out.dtype)
            self._launch(name, grid, (32, MMA_EXPAND_WARPS), (*head, *segments, *tail))
            return
        # Generic kernel: small blocks spread one row's columns over more SMs.
        threads = 64 if n_vec > 32 else 32
        rank_splits = min(_MAX_THREADS // threads, max(1, max_lora_rank // 8))
        grid = (-(-num_tokens // GENERIC_ROWS), -(-n_vec // threads))
        self._check_grid(op, grid, sizes)
        args = (*head, 0, *segments, *tail)
        name = kernel_name("expand", out.dtype, vec, GENERIC_ROWS)
        self._launch(name, grid, (threads, rank_splits), args)

    def _use_mma(self, dtype: torch.dtype, vec: int, num_tokens: int, num_segments: int) -> bool:
        """Whether an sgmv call takes the tensor-core kernels (shapes only, never index values)."""
        return (
            self._mma
            and dtype in MMA_TYPES
            and vec == _wide_vec(dtype)
            and num_tokens >= self.sgmv_mma_min_rows_per_segment * num_segments
        )

    def _check_indices(
        self, op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
    ) -> int:
        """Check the index tensors; return num_segments (0 for bgmv)."""
        dev = self.device
        _check(op, "lora_ranks", lora_ranks, torch.int32, 1, dev, True)
        _check_len(op, "lora_ranks", lora_ranks, num_slots, "num_slots of the stack")
        if slot_ids is not None:
            _check(op, "slot_ids", slot_ids, torch.int32, 1, dev, True)
            _check_len(op, "slot_ids", slot_ids, num_tokens, "num_tokens")
            return 0
        _check(op, "segment_indptr", segment_indptr, torch.int32, 1, dev, True)
        _check(op, "segment_slot_ids", segment_slot_ids, torch.int32, 1, dev, True)
        num_segments = segment_slot_ids.shape[0]
        _check_len(op, "segment_indptr", segment_indptr, num_segments + 1, "num_segments + 1")
        return num_segments

    @staticmethod
    def _check_grid(op: str, grid: tuple[int, int], sizes: str) -> None:
        if grid[0] > _MAX_GRID_X or grid[1] > _MAX_GRID_Y:
            raise ValueError(f"{op}: launch grid {grid} exceeds the CUDA limits for {sizes}")

    def _launch(
        self, name: str, grid: tuple[int, int], block: tuple[int, int], args: tuple, smem: int = 0
    ) -> None:
        """Launch on torch's current stream of this device with `smem` bytes of dynamic shared memory;
        every argument is a 64-bit integer (the kernels take pointers and long long sizes), which CuPy
        passes as int64."""
        handle = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it still does the job
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = self._cupy.cuda.ExternalStream(handle, self.device.index)
            self._streams[handle] = stream
        with self._cupy_device:
            self._kernels[name](grid, block, args, shared_mem=smem, stream=stream)
