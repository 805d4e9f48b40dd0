"""CUDA implementation of the LoRA ops over the adapter pool: `csrc/lora_gather_matmul.cu`, compiled by CuPy.

Semantics are `reference.lora_site_ref` (the spec; arguments in `pool_args.py`); the `.cu` header states
the kernels' layouts and launch shapes, `cuda_source.py` their compile-time sizes and instances. One
`lora_site` call is, for each part (q, k, v of a fused qkv; gate, up; or a single o or down), a shrink
y[i, :r] = x[i] @ a_view[a_rows[g, :r]].T into a float32 scratch and an expand
out[i, o:o+h_out] += y[i, :r] @ b_view[b_rows[g, :r]]. Parts are never fused into one launch: a fused
expand would read the other parts' block-diagonal zeros. What this wrapper adds:

- Compilation once per process (`cuda_source.raw_module`), for the architecture of the ops' device.
- Zero copy: kernels get the tensors' device pointers (`data_ptr()`, the address DLPack and
  `__cuda_array_interface__` would hand over too, without creating an array object per call) and run
  on torch's current stream, so they order with torch's work and are captured by `torch.cuda.graph`.
- No allocation per call: the float32 y scratch is cached (one growing buffer per stream for eager calls;
  one buffer per stream and shape, kept for the ops' lifetime, for calls under graph capture, because a
  captured graph holds its address). Launch grids depend on shapes only (never on adapter, rank or row
  id values), so a captured graph replays correctly with new tables in the same buffers. Eager calls
  skip the parts that no adapter of the step targets, by the host copies (no device sync); calls under
  capture launch every part, since their replays may see other ranks.
- dtypes: x, the pool and out share the model dtype, bfloat16 or float16 (float32 works too, at twice
  the bytes; the tiny test models run in it). y is always float32.
- Index values are not checked on the host (that would synchronise): an adapter index outside [0, G) or
  a row past the last segment is skipped on the device, a rank is clamped to the tables' R_max, and a row
  id outside its view is never read (its products are NaN: loud, never a fault).
- Kernel choice (shapes only): `rows.use_segments` False takes lora_bgmv_shrink / lora_bgmv_expand;
  True takes the tensor-core kernels (lora_sgmv_*_mma) for bfloat16 / float16 with 16-byte aligned rows
  (x, out and both views: pointers, row strides, widths and out_offset; a pool row j of width w starts at
  element j * w, so w * element size % 16 == 0 and an aligned storage make every row aligned) on sm_80+
  when the batch averages at least `sgmv_mma_min_rows_per_segment` rows per segment, else the generic
  lora_shrink / lora_expand. The tensor-core shrink streams through a per-warp cp.async ring of about
  144 KiB of dynamic shared memory per block; the constructor raises the kernels' limit for it (once,
  before any graph capture) and falls back to the generic sgmv kernels if the device refuses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from worker.kernels.cuda_source import (
    DEFAULT_SMEM,
    EXPAND_ROWS_IN_FLIGHT,
    GENERIC_ROWS,
    KERNEL_TYPES,
    MAX_THREADS,
    MMA_COLS,
    MMA_EXPAND_WARPS,
    MMA_K,
    MMA_SHRINK_TILES,
    MMA_TYPES,
    NAME_EXPRESSIONS,
    SHRINK_CHUNKS,
    SHRINK_RANK_ROWS,
    bgmv_expand_smem,
    bgmv_shrink_smem,
    kernel_name,
    mma_shrink_smem,
    raw_module,
    wide_vec,
)
from worker.kernels.pool_args import PoolPart, StepRows

_MAX_GRID_X, _MAX_GRID_Y = 2**31 - 1, 65535


def _vec(dtype: torch.dtype, sizes: tuple[int, ...], tensors: tuple[torch.Tensor, ...]) -> int:
    """16-byte accesses when every size (in elements) and pointer allows them, else one element."""
    vec = wide_vec(dtype)
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


def _check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape} ({what})")


class CudaLoraOps:
    """The pool op of a LoRA site as CUDA kernels on one device (see the module docstring)."""

    # bgmv handles any adapter order at full speed, so decode rows need no grouping into segments.
    decode_uses_segments = False
    mixes_prompt_and_decode = False  # prompt rows take the sgmv kernels, decode rows bgmv

    # sgmv batches average at least this many rows per segment to take the tensor-core kernels (each
    # (row tile, segment) pair re-reads the adapter's weights; shorter segments go to the generic kernels).
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
        self._init_state()
        props = torch.cuda.get_device_properties(index)
        self._num_sms = props.multi_processor_count
        # Enough resident blocks to keep every SM's loads in flight (a shape-only launch heuristic).
        self._target_blocks = 4 * self._num_sms
        self._mma = props.major >= 8  # mma.sync with bf16 / f16 / tf32 operands
        module = raw_module()
        with self._cupy_device:  # compile for, and load on, this device
            raw = {name: module.get_function(name) for name in NAME_EXPRESSIONS}
            self._kernels = {name: kernel.kernel for name, kernel in raw.items()}
            if self._mma:
                self._mma = self._allow_mma_shrink_smem(raw)
        # One launch with no rows: creates CuPy's per-thread context state now, not under graph capture.
        self._launch(kernel_name("shrink", torch.float32, 1, GENERIC_ROWS), (1, 1), (32, 1), (0,) * 16)

    def _init_state(self) -> None:
        """The caches: y scratch (eager: stream -> buffer; captured: (stream, T, R) -> buffer) and the
        adapters the last StepRows uses."""
        self._eager_scratch: dict[int, torch.Tensor] = {}
        self._graph_scratch: dict[tuple[int, int, int], torch.Tensor] = {}
        self._used_of: tuple[StepRows | None, frozenset[int]] = (None, frozenset())

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

    def pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The model dtype: the kernels read x, the pool and out in one 16- or 32-bit float type."""
        if model_dtype not in KERNEL_TYPES:
            raise ValueError(f"CudaLoraOps supports {list(KERNEL_TYPES)} models, got {model_dtype}")
        return model_dtype

    def row_order(self, adapters: list[int], adapter_lora_ranks: dict[int, int]) -> list[int]:
        """Sequences grouped by adapter (stable): each adapter's prompt rows form one sgmv segment.
        bgmv takes rows in any order and the kernels handle mixed ranks, so ranks play no part."""
        return sorted(range(len(adapters)), key=adapters.__getitem__)

    def lora_site(
        self,
        x: torch.Tensor,
        a_view: torch.Tensor,
        parts: Sequence[PoolPart],
        rows: StepRows,
        out: torch.Tensor,
    ) -> None:
        """Semantics (`reference.lora_site_ref`): for every part p and row i with g = rows' adapter of i
        (g = -1: none) and r = p.lora_ranks[g] (0: adapter g does not target p),
        out[i, o:o+h_out] += (x[i] @ a_view[p.a_rows[g, :r]].T) @ p.b_view[p.b_rows[g, :r]], o = p.out_offset,
        with the x@A intermediate in float32 and the sum rounded once.

        x: [T, h_in] model dtype (rows may be strided). a_view: [num_rows, h_in] the pool's view of width
        h_in, same dtype, contiguous. out: [T, h_total] same dtype (rows may be strided), changed in place
        in each part's columns of the rows its adapters target, nowhere else. Each part: b_view
        [num_rows, h_out] contiguous, a_rows / b_rows [G, R_max] int32 (contiguous rows), lora_ranks [G]
        int32, with G = len(rows.adapters). rows: bgmv over row_adapter [T] when not rows.use_segments,
        sgmv over segment_indptr / segment_adapters when it is. Raises ValueError on a bad argument before
        any launch; never synchronises.
        """
        self._check_site(x, a_view, parts, rows, out)
        num_tokens = x.shape[0]
        if num_tokens == 0 or (rows.use_segments and not rows.host_segment_adapters):
            return
        parts = [p for p in parts if p.a_rows.shape[1] > 0]  # R_max == 0: no adapter has rows (a shape)
        if not self._capturing():
            used = self._used_adapters(rows)
            parts = [p for p in parts if any(p.host_lora_ranks[g] for g in used)]
        if not parts:
            return
        y = self._scratch(num_tokens, max(p.a_rows.shape[1] for p in parts))
        for part in parts:
            self._shrink(x, a_view, part, rows, y)
            self._expand(y, part, rows, out)

    def _check_site(self, x, a_view, parts, rows, out) -> None:
        """Every argument of a lora_site call: shapes, dtypes, devices, layouts (values are not read)."""
        op, dev = "lora_site", self.device
        _check(op, "x", x, None, 2, dev, False)
        _check(op, "a_view", a_view, x.dtype, 2, dev, True)
        _check(op, "out", out, x.dtype, 2, dev, False)
        num_tokens, h_in = x.shape
        if a_view.shape[1] != h_in or out.shape[0] != num_tokens:
            raise ValueError(
                f"{op}: sizes disagree: x {tuple(x.shape)}, a_view {tuple(a_view.shape)}, out "
                f"{tuple(out.shape)} (expected a_view [num_rows, {h_in}] and out [{num_tokens}, h_total])"
            )
        num_segments = len(rows.host_segment_adapters)
        for name, shape in [
            ("row_adapter", (num_tokens,)),
            ("segment_indptr", (num_segments + 1,)),
            ("segment_adapters", (num_segments,)),
        ]:
            t = getattr(rows, name)
            _check(op, f"rows.{name}", t, torch.int32, 1, dev, True)
            _check_shape(op, f"rows.{name}", t, shape, f"{num_tokens} rows, {num_segments} segments")
        if len(rows.host_indptr) != num_segments + 1 or rows.host_indptr[-1] != num_tokens:
            raise ValueError(
                f"{op}: rows describe {rows.host_indptr[-1]} rows in {len(rows.host_indptr) - 1} "
                f"segments, x has {num_tokens} rows"
            )
        num_adapters = len(rows.adapters)
        for part in parts:
            pop = f"{op} {part.key}"
            _check(pop, "b_view", part.b_view, x.dtype, 2, dev, True)
            _check(pop, "a_rows", part.a_rows, torch.int32, 2, dev, False)
            g_r = (num_adapters, part.a_rows.shape[1])
            _check_shape(pop, "a_rows", part.a_rows, g_r, f"G = {num_adapters} adapters in rows")
            _check(pop, "b_rows", part.b_rows, torch.int32, 2, dev, False)
            _check_shape(pop, "b_rows", part.b_rows, g_r, "the shape of a_rows")
            _check(pop, "lora_ranks", part.lora_ranks, torch.int32, 1, dev, True)
            _check_shape(pop, "lora_ranks", part.lora_ranks, (num_adapters,), "G")
            if len(part.host_lora_ranks) != num_adapters:
                raise ValueError(
                    f"{pop}: host_lora_ranks has {len(part.host_lora_ranks)} entries, expected {num_adapters}"
                )
            h_out, o, h_total = part.h_out, part.out_offset, out.shape[1]
            if not 0 <= o <= h_total - h_out:
                raise ValueError(f"{pop}: columns [{o}, {o + h_out}) are not within out's {h_total}")
            if bgmv_expand_smem(part.b_rows.shape[1]) > DEFAULT_SMEM:
                raise ValueError(
                    f"{pop}: R_max {part.b_rows.shape[1]} exceeds the kernels' {DEFAULT_SMEM // 4} row ids"
                )

    def _used_adapters(self, rows: StepRows) -> frozenset[int]:
        """The adapters g in [0, G) that rows use (host copies; cached for the last rows seen)."""
        last, used = self._used_of
        if last is not rows:
            num_adapters = len(rows.adapters)
            used = frozenset(g for g in rows.host_segment_adapters if 0 <= g < num_adapters)
            self._used_of = (rows, used)
        return used

    def _scratch(self, num_tokens: int, r_max: int) -> torch.Tensor:
        """The float32 y scratch [num_tokens, r_max] for the current stream (contents unspecified)."""
        stream = self._stream_handle()
        if self._capturing():  # a graph holds this address: a buffer of its own, never freed or moved
            key = (stream, num_tokens, r_max)
            if key not in self._graph_scratch:
                self._graph_scratch[key] = torch.empty(
                    num_tokens, r_max, dtype=torch.float32, device=self.device
                )
            return self._graph_scratch[key]
        need = num_tokens * r_max
        buf = self._eager_scratch.get(stream)
        if buf is None or buf.numel() < need:  # grows in powers of two: few reallocations over prompts
            buf = torch.empty(_pow2_at_least(need), dtype=torch.float32, device=self.device)
            self._eager_scratch[stream] = buf
        return buf[:need].view(num_tokens, r_max)

    def _shrink(self, x: torch.Tensor, a_view: torch.Tensor, part: PoolPart, rows: StepRows, y: torch.Tensor):
        """y[i, :r] = x[i] @ a_view[part.a_rows[g, :r]].T (lora_bgmv_shrink, lora_sgmv_shrink_mma or
        lora_shrink)."""
        num_tokens, h_in = x.shape
        num_adapters, max_lora_rank = part.a_rows.shape
        vec = _vec(x.dtype, (h_in, x.stride(0)), (x, a_view))
        n_vec = h_in // vec
        head = (x.data_ptr(), x.stride(0), a_view.data_ptr(), a_view.shape[0])
        head += (part.a_rows.data_ptr(), part.a_rows.stride(0))
        tail = (
            part.lora_ranks.data_ptr(),
            num_adapters,
            y.data_ptr(),
            y.stride(0),
            num_tokens,
            h_in,
            max_lora_rank,
        )
        sizes = f"num_tokens={num_tokens}, R_max={max_lora_rank}"
        if not rows.use_segments:
            # One row per block, 4 rank rows; each thread loads 2 vectors of x and of each rank row at once.
            threads = min(MAX_THREADS, max(32, _pow2_at_least(-(-n_vec // SHRINK_CHUNKS))))
            grid = (num_tokens, min(-(-max_lora_rank // SHRINK_RANK_ROWS), _MAX_GRID_Y))
            self._check_grid(grid, sizes)
            args = (*head, rows.row_adapter.data_ptr(), *tail)
            smem = bgmv_shrink_smem(threads, vec, x.dtype)  # cp.async staging
            self._launch(kernel_name("bgmv_shrink", x.dtype, vec), grid, (threads, 1), args, smem)
            return
        num_segments = len(rows.host_segment_adapters)
        args = (*head, rows.segment_indptr.data_ptr(), rows.segment_adapters.data_ptr(), num_segments, *tail)
        if self._use_mma(x.dtype, vec, num_tokens, num_segments):
            # Tiles of 32 rows x 16 ranks when they alone give about a block per SM, else 16 x 8.
            big = -(-num_tokens // 32) * -(-max_lora_rank // 16) * 10 >= 9 * self._num_sms
            mt, ng = (2, 2) if big else (1, 1)
            warps = min(MMA_SHRINK_TILES[(mt, ng)], -(-h_in // MMA_K))  # warps split h_in's chunks
            grid = (-(-num_tokens // (16 * mt)), min(-(-max_lora_rank // (8 * ng)), _MAX_GRID_Y))
            self._check_grid(grid, sizes)
            name = kernel_name("sgmv_shrink_mma", x.dtype, mt, ng)
            self._launch(name, grid, (32, warps), args, mma_shrink_smem(mt, ng, warps))
            return
        # Generic kernel: threads of one rank row split h_in, about 4 vectors each; the rest of the block
        # takes more rank rows. Few tokens: one block per rank tile; many: blocks loop over tiles.
        threads_per_row = min(MAX_THREADS, max(32, _pow2_at_least(-(-n_vec // 4))))
        rank_rows = min(MAX_THREADS // threads_per_row, max_lora_rank)
        num_groups, num_tiles = -(-num_tokens // GENERIC_ROWS), -(-max_lora_rank // rank_rows)
        grid = (num_groups, min(num_tiles, max(1, -(-self._target_blocks // num_groups))))
        self._check_grid(grid, sizes)
        name = kernel_name("shrink", x.dtype, vec, GENERIC_ROWS)
        self._launch(name, grid, (threads_per_row, rank_rows), args)

    def _expand(self, y: torch.Tensor, part: PoolPart, rows: StepRows, out: torch.Tensor):
        """out[i, o:o+h_out] += y[i, :r] @ part.b_view[part.b_rows[g, :r]] (lora_bgmv_expand,
        lora_sgmv_expand_mma or lora_expand)."""
        num_tokens = out.shape[0]
        num_adapters, max_lora_rank = part.b_rows.shape
        b_view, h_out, out_offset = part.b_view, part.h_out, part.out_offset
        vec = _vec(out.dtype, (h_out, out.stride(0), out_offset), (out, b_view))
        n_vec = h_out // vec
        head = (y.data_ptr(), y.stride(0), b_view.data_ptr(), b_view.shape[0])
        head += (part.b_rows.data_ptr(), part.b_rows.stride(0))
        tail = (part.lora_ranks.data_ptr(), num_adapters, out.data_ptr(), out.stride(0), out_offset)
        tail += (num_tokens, h_out, max_lora_rank)
        sizes = f"num_tokens={num_tokens}, h_out={h_out}"
        if not rows.use_segments:
            # The rank is split over threadIdx.y so that each thread has at most 8 rows of B in flight.
            rank_splits = min(MAX_THREADS // 32, max(1, -(-max_lora_rank // EXPAND_ROWS_IN_FLIGHT)))
            threads = 64 if n_vec > 32 and 64 * rank_splits <= MAX_THREADS else 32
            grid = (num_tokens, -(-n_vec // threads))
            self._check_grid(grid, sizes)
            args = (*head, rows.row_adapter.data_ptr(), *tail)
            name = kernel_name("bgmv_expand", out.dtype, vec)
            self._launch(name, grid, (threads, rank_splits), args, bgmv_expand_smem(max_lora_rank))
            return
        num_segments = len(rows.host_segment_adapters)
        args = (*head, rows.segment_indptr.data_ptr(), rows.segment_adapters.data_ptr(), num_segments, *tail)
        if self._use_mma(out.dtype, vec, num_tokens, num_segments):
            grid = (-(-num_tokens // 16), -(-h_out // (MMA_COLS * MMA_EXPAND_WARPS)))
            self._check_grid(grid, sizes)
            self._launch(kernel_name("sgmv_expand_mma", out.dtype), grid, (32, MMA_EXPAND_WARPS), args)
            return
        # Generic kernel: small blocks spread one row's columns over more SMs.
        threads = 64 if n_vec > 32 else 32
        rank_splits = min(MAX_THREADS // threads, max(1, max_lora_rank // 8))
        grid = (-(-num_tokens // GENERIC_ROWS), -(-n_vec // threads))
        self._check_grid(grid, sizes)
        self._launch(kernel_name("expand", out.dtype, vec, GENERIC_ROWS), grid, (threads, rank_splits), args)

    def _use_mma(self, dtype: torch.dtype, vec: int, num_tokens: int, num_segments: int) -> bool:
        """Whether an sgmv call takes the tensor-core kernels (shapes only, never index values)."""
        return (
            self._mma
            and dtype in MMA_TYPES
            and vec == wide_vec(dtype)
            and num_tokens >= self.sgmv_mma_min_rows_per_segment * num_segments
        )

    @staticmethod
    def _check_grid(grid: tuple[int, int], sizes: str) -> None:
        if grid[0] > _MAX_GRID_X or grid[1] > _MAX_GRID_Y:
            raise ValueError(f"lora_site: launch grid {grid} exceeds the CUDA limits for {sizes}")

    def _capturing(self) -> bool:
        """Whether torch's current stream is capturing a CUDA graph (a query, no sync)."""
        return torch.cuda.is_current_stream_capturing()

    def _stream_handle(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _launch(
        self, name: str, grid: tuple[int, int], block: tuple[int, int], args: tuple, smem: int = 0
    ) -> None:
        """Launch on torch's current stream of this device with `smem` bytes of dynamic shared memory;
        every argument is a 64-bit integer (the kernels take pointers and long long sizes), which CuPy
        passes as int64."""
        handle = self._stream_handle()
        stream = self._streams.get(handle)
        if stream is None:
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it still does the job
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = self._cupy.cuda.ExternalStream(handle, self.device.index)
            self._streams[handle] = stream
        with self._cupy_device:
            self._kernels[name](grid, block, args, shared_mem=smem, stream=stream)
