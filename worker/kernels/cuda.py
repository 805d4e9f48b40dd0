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
  row past the last segment is skipped on the device, and a rank is clamped to max_rank.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

SOURCE_PATH = Path(__file__).resolve().parents[2] / "csrc" / "lora_gather_matmul.cu"
# No options of our own: CuPy adds the architecture and its C++ dialect (the source is plain C++14).
COMPILE_OPTIONS: tuple[str, ...] = ()

# torch dtype -> the element type of the kernel templates.
KERNEL_TYPES = {torch.bfloat16: "Bf16", torch.float16: "Fp16", torch.float32: "Fp32"}
# Rows of x fused per block: 1 for bgmv (rows rarely share a slot), 4 for sgmv (segments do).
BGMV_ROWS, SGMV_ROWS = 1, 4
_MAX_THREADS = 256  # LORA_MAX_THREADS: the kernels size their shared memory for it
_MAX_GRID_X, _MAX_GRID_Y = 2**31 - 1, 65535


def _wide_vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte access."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def kernel_name(op: str, dtype: torch.dtype, vec: int, rows: int) -> str:
    """The name expression of one template instance, e.g. 'lora_shrink<Bf16, 8, 1>'."""
    return f"lora_{op}<{KERNEL_TYPES[dtype]}, {vec}, {rows}>"


# Every instance the wrapper can launch; the nvcc compile test instantiates the same list.
NAME_EXPRESSIONS = tuple(
    kernel_name(op, dtype, vec, rows)
    for op in ("shrink", "expand")
    for dtype in KERNEL_TYPES
    for vec in (_wide_vec(dtype), 1)
    for rows in (BGMV_ROWS, SGMV_ROWS)
)
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
        # Enough resident blocks to keep every SM's loads in flight (a shape-only launch heuristic).
        self._target_blocks = 4 * torch.cuda.get_device_properties(index).multi_processor_count
        module = _raw_module()
        with self._cupy_device:  # compile for, and load on, this device
            self._kernels = {name: module.get_function(name).kernel for name in NAME_EXPRESSIONS}
        # One launch with no rows: creates CuPy's per-thread context state now, not under graph capture.
        self._launch(kernel_name("shrink", torch.float32, 1, 1), (1, 1), (32, 1), (0,) * 14)

    def stack_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The model dtype: the kernels read x and the stacks in one 16- or 32-bit float type."""
        if model_dtype not in KERNEL_TYPES:
            raise ValueError(f"CudaLoraOps supports {list(KERNEL_TYPES)} models, got {model_dtype}")
        return model_dtype

    def bgmv_shrink(self, x, lora_a_stack, slot_ids, lora_ranks, y) -> None:
        """Semantics: y[i, :r] = x[i] @ lora_a_stack[s, :r].T  where s = slot_ids[i], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype (rows may be strided). lora_a_stack: [num_slots, max_rank,
        h_in] same dtype, contiguous. slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32
        (0 = row skipped). y: [num_tokens, max_rank] float32, changed in place in columns < r only.
        """
        self._shrink("bgmv_shrink", x, lora_a_stack, slot_ids, None, None, lora_ranks, y)

    def bgmv_expand(self, y, lora_b_stack, slot_ids, lora_ranks, out, out_offset: int = 0) -> None:
        """Semantics: out[i, o:o+h_out] += y[i, :r] @ lora_b_stack[s, :r]  with s = slot_ids[i],
        r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_rank] float32. lora_b_stack: [num_slots, max_rank, h_out] model dtype,
        contiguous. slot_ids: [num_tokens] int32. lora_ranks: [num_slots] int32 (0 = row untouched).
        out: [num_tokens, h_total] model dtype (rows may be strided), changed in place in columns
        [o, o + h_out) of rows with an adapter (float32 sum, rounded once).
        """
        self._expand("bgmv_expand", y, lora_b_stack, slot_ids, None, None, lora_ranks, out, out_offset)

    def sgmv_shrink(self, x, lora_a_stack, segment_indptr, segment_slot_ids, lora_ranks, y) -> None:
        """Semantics: y[p:q, :r] = x[p:q] @ lora_a_stack[s, :r].T  for each segment g with rows
        [p, q) = segment_indptr[g:g+2], s = segment_slot_ids[g], r = lora_ranks[s].

        x: [num_tokens, h_in] model dtype. lora_a_stack: [num_slots, max_rank, h_in] same dtype.
        segment_indptr: [num_segments + 1] int32 (non-decreasing, from 0; segments may be empty).
        segment_slot_ids: [num_segments] int32. lora_ranks: [num_slots] int32.
        y: [num_tokens, max_rank] float32, changed in place in columns < r of each segment's rows.
        """
        self._shrink("sgmv_shrink", x, lora_a_stack, None, segment_indptr, segment_slot_ids, lora_ranks, y)

    def sgmv_expand(
        self, y, lora_b_stack, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset: int = 0
    ) -> None:
        """Semantics: out[p:q, o:o+h_out] += y[p:q, :r] @ lora_b_stack[s, :r]  for each segment g with
        rows [p, q), s = segment_slot_ids[g], r = lora_ranks[s], o = out_offset.

        y: [num_tokens, max_rank] float32. lora_b_stack: [num_slots, max_rank, h_out] model dtype.
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

    def _shrink(self, op, x, lora_a_stack, slot_ids, segment_indptr, segment_slot_ids, lora_ranks, y):
        dev = self.device
        _check(op, "x", x, None, 2, dev, False)
        _check(op, "lora_a_stack", lora_a_stack, x.dtype, 3, dev, True)
        _check(op, "y", y, torch.float32, 2, dev, False)
        num_tokens, h_in = x.shape
        num_slots, max_rank, a_h_in = lora_a_stack.shape
        if a_h_in != h_in or tuple(y.shape) != (num_tokens, max_rank):
            raise ValueError(
                f"{op}: sizes disagree: x {tuple(x.shape)}, lora_a_stack {tuple(lora_a_stack.shape)}, "
                f"y {tuple(y.shape)} (expected y [{num_tokens}, {max_rank}])"
            )
        rows, num_segments = self._check_indices(
            op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
        )
        if num_tokens == 0 or max_rank == 0 or (slot_ids is None and num_segments == 0):
            return
        vec = _vec(x.dtype, (h_in, x.stride(0)), (x, lora_a_stack))
        # Threads of one rank row split h_in, about 4 vectors each; the rest of the block takes more rows.
        threads_per_row = min(_MAX_THREADS, max(32, _pow2_at_least(-(-h_in // (4 * vec)))))
        rank_rows = min(_MAX_THREADS // threads_per_row, max_rank)
        # Few tokens: one block per rank tile to spread the work; many: blocks loop over tiles, reusing x.
        num_groups, num_tiles = -(-num_tokens // rows), -(-max_rank // rank_rows)
        grid = (num_groups, min(num_tiles, max(1, -(-self._target_blocks // num_groups))))
        self._check_grid(op, grid, f"num_tokens={num_tokens}, max_rank={max_rank}")
        args = (
            x.data_ptr(),
            x.stride(0),
            lora_a_stack.data_ptr(),
            *self._index_args(slot_ids, segment_indptr, segment_slot_ids, num_segments),
            lora_ranks.data_ptr(),
            num_slots,
            y.data_ptr(),
            y.stride(0),
            num_tokens,
            h_in,
            max_rank,
        )
        self._launch(kernel_name("shrink", x.dtype, vec, rows), grid, (threads_per_row, rank_rows), args)

    def _expand(
        self, op, y, lora_b_stack, slot_ids, segment_indptr, segment_slot_ids, lora_ranks, out, out_offset
    ):
        dev = self.device
        _check(op, "out", out, None, 2, dev, False)
        _check(op, "lora_b_stack", lora_b_stack, out.dtype, 3, dev, True)
        _check(op, "y", y, torch.float32, 2, dev, False)
        num_tokens, h_total = out.shape
        num_slots, max_rank, h_out = lora_b_stack.shape
        out_offset = int(out_offset)
        if tuple(y.shape) != (num_tokens, max_rank) or not 0 <= out_offset <= h_total - h_out:
            raise ValueError(
                f"{op}: sizes disagree: y {tuple(y.shape)}, lora_b_stack {tuple(lora_b_stack.shape)}, "
                f"out {tuple(out.shape)}, out_offset {out_offset} (expected y [{num_tokens}, {max_rank}] "
                f"and columns [{out_offset}, {out_offset + h_out}) within out's {h_total})"
            )
        rows, num_segments = self._check_indices(
            op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
        )
        if num_tokens == 0 or max_rank == 0 or h_out == 0 or (slot_ids is None and num_segments == 0):
            return
        vec = _vec(out.dtype, (h_out, out.stride(0), out_offset), (out, lora_b_stack))
        n_vec = h_out // vec
        threads = 64 if n_vec > 32 else 32  # small blocks spread one row's columns over more SMs
        # The rank is split over threadIdx.y (about 8 rank rows each): more loads in flight per column.
        rank_splits = min(_MAX_THREADS // threads, max(1, max_rank // 8))
        grid = (-(-num_tokens // rows), -(-n_vec // threads))
        self._check_grid(op, grid, f"num_tokens={num_tokens}, h_out={h_out}")
        args = (
            y.data_ptr(),
            y.stride(0),
            lora_b_stack.data_ptr(),
            *self._index_args(slot_ids, segment_indptr, segment_slot_ids, num_segments),
            lora_ranks.data_ptr(),
            num_slots,
            out.data_ptr(),
            out.stride(0),
            out_offset,
            num_tokens,
            h_out,
            max_rank,
        )
        self._launch(kernel_name("expand", out.dtype, vec, rows), grid, (threads, rank_splits), args)

    def _check_indices(
        self, op, num_tokens, num_slots, slot_ids, segment_indptr, segment_slot_ids, lora_ranks
    ):
        """Check the index tensors; return (rows fused per block, num_segments)."""
        dev = self.device
        _check(op, "lora_ranks", lora_ranks, torch.int32, 1, dev, True)
        _check_len(op, "lora_ranks", lora_ranks, num_slots, "num_slots of the stack")
        if slot_ids is not None:
            _check(op, "slot_ids", slot_ids, torch.int32, 1, dev, True)
            _check_len(op, "slot_ids", slot_ids, num_tokens, "num_tokens")
            return BGMV_ROWS, 0
        _check(op, "segment_indptr", segment_indptr, torch.int32, 1, dev, True)
        _check(op, "segment_slot_ids", segment_slot_ids, torch.int32, 1, dev, True)
        num_segments = segment_slot_ids.shape[0]
        _check_len(op, "segment_indptr", segment_indptr, num_segments + 1, "num_segments + 1")
        return SGMV_ROWS, num_segments

    @staticmethod
    def _index_args(slot_ids, segment_indptr, segment_slot_ids, num_segments):
        """(slot_ids, segment_indptr, segment_slot_ids, num_segments) kernel arguments; 0 = nullptr."""
        if slot_ids is not None:
            return slot_ids.data_ptr(), 0, 0, 0
        return 0, segment_indptr.data_ptr(), segment_slot_ids.data_ptr(), num_segments

    @staticmethod
    def _check_grid(op: str, grid: tuple[int, int], sizes: str) -> None:
        if grid[0] > _MAX_GRID_X or grid[1] > _MAX_GRID_Y:
            raise ValueError(f"{op}: launch grid {grid} exceeds the CUDA limits for {sizes}")

    def _launch(self, name: str, grid: tuple[int, int], block: tuple[int, int], args: tuple) -> None:
        """Launch on torch's current stream of this device; every argument is a 64-bit integer (the
        kernels take pointers and long long sizes), which CuPy passes as int64."""
        handle = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it still does the job
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = self._cupy.cuda.ExternalStream(handle, self.device.index)
            self._streams[handle] = stream
        with self._cupy_device:
            self._kernels[name](grid, block, args, stream=stream)
