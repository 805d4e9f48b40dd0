// lora_gather_matmul.cu: punica-style LoRA gather matmuls over the paged adapter pool, BGMV (one adapter
// per row; decode) and SGMV (contiguous segments of rows sharing an adapter; prefill). Compiled at run
// time by NVRTC through cupy.RawModule (worker/kernels/cuda.py); the templates are instantiated there by
// name expression.
//
// Semantics (worker/kernels/reference.py, lora_pool_ref, is the spec; one shrink and one expand per part
// of a LoRA site make lora_site_ref):
//   lora_*shrink: y[i, :r]            = x[i] @ a_view[a_rows[g, :r]].T  (fp32 accumulation, fp32 y)
//   lora_*expand: out[i, o:o + h_out] += y[i, :r] @ b_view[b_rows[g, :r]] (fp32 sum, rounded once to T)
// where g is the adapter of row i (an index into the step's G adapters) and r = lora_ranks[g]:
//   bgmv (row_adapter):               g = row_adapter[i]
//   sgmv (segment_indptr):            g = segment_adapters[s] for the s with
//                                     segment_indptr[s] <= i < segment_indptr[s + 1]
// A row is skipped entirely (no loads of weights, y / out untouched) when g == -1 ("no adapter") or g is
// outside [0, num_adapters), when r == 0 (adapter g does not target this module), or (sgmv) when
// i >= segment_indptr[num_segments]. r is clamped to [0, max_lora_rank]. (One exception to "no loads":
// lora_sgmv_expand_mma reads, never writes, its tile's rows of out before it knows their segments.)
//
// The pool (worker/lora/pool.py): one flat tensor, NaN wherever no adapter's row is. A view of width w is
// [num_rows, w] over it, and row id j of that view starts at element j * w, formed in 64 bits
// (view + (long long)j * w: the product passes 2^31 in a large pool, row ids do not). a_view has width
// h_in, b_view width h_out. Rank row k < r of adapter g is row a_rows[g, k] of a_view (A) and row
// b_rows[g, k] of b_view (B^T, the LoRA scale folded in). Table entries at k >= r are PAD_ROW padding:
// kernels may load such an int from the table (it lies inside the table's [G, max_lora_rank] and the
// bgmv kernels fetch the table with the rank, to save a round trip) but never use it, and no pool row is
// read for a rank row k >= r. Only r rows are read per adapter, so mixed ranks share one launch at their
// own cost. A table entry at k < r that is not a row of its view (id < 0 or id >= num_rows: a corrupt
// table) is never dereferenced either; that rank row's products are NaN instead, so the rows it feeds
// come out NaN (loud, like reading a NaN pool row) rather than silently wrong or a fault.
//
// Layouts (row-major; the innermost dimension is contiguous, row strides are in elements):
//   x                [num_tokens, h_in]                 T, row stride x_stride
//   a_view           [a_num_rows, h_in]                 T, contiguous (the pool as rows of width h_in)
//   b_view           [b_num_rows, h_out]                T, contiguous (the pool as rows of width h_out)
//   a_rows, b_rows   [num_adapters, max_lora_rank]      int32 row ids, row stride rows_stride
//   lora_ranks       [num_adapters]                     int32
//   row_adapter      [num_tokens]                       int32 (bgmv), g in [-1, num_adapters)
//   segment_indptr   [num_segments + 1]                 int32 (sgmv), non-decreasing, [0] == 0
//   segment_adapters [num_segments]                     int32 (sgmv)
//   y                [num_tokens, >= max_lora_rank]     float32, row stride y_stride
//   out              [num_tokens, h_total]              T, row stride out_stride; columns [out_offset, +h_out)
// T is Bf16, Fp16 or Fp32: a storage type (uint16 bits or float) plus conversions. No CUDA header is
// included (conversions are bit operations and PTX), so NVRTC needs no include path.
// VEC is the number of elements per load/store: 16 bytes (8 for 16-bit types, 4 for fp32) or 1. VEC > 1
// requires every pointer (x, the view, out), row stride, width (h_in or h_out) and out_offset to be a
// multiple of VEC elements: then every pool row (at element id * width of a 16-byte aligned view) is 16-byte
// aligned too. The wrapper checks this and otherwise launches VEC == 1. Every launch shape is a function
// of tensor shapes only, never of index values, so CUDA graphs capture them and replay them with new
// tables in the same buffers; no kernel allocates, and y is the wrapper's cached scratch.
//
// Kernels (the wrapper picks one per call; its shape-only rules are in worker/kernels/cuda.py):
//   lora_bgmv_shrink<T, VEC> (bgmv, any T / VEC): grid (num_tokens, rank groups of 4), 1-D block of
//     32..256 threads. A block computes LORA_SHRINK_RANK_ROWS (4) rank rows of one row i: per step each
//     thread fetches 2 vectors of x and the matching 2 vectors of the 4 A rows (10 loads, all in flight
//     before the first product: 16-byte vectors through cp.async into dynamic shared memory, 10 * blockDim
//     vectors, since ptxas interleaves register loads with their FMAs), accumulates 4 fp32 sums, and the
//     block reduces them (warp shuffles, then shared memory in warp order). The group's 4 row ids are
//     loaded with the rank (every thread, one address each). Blocks whose rank group starts at or past
//     the row's rank return after the index loads.
//   lora_bgmv_expand<T, VEC> (bgmv, any T / VEC): grid (num_tokens, column blocks), block (column
//     threads 32 or 64, rank splits), dynamic shared memory of max_lora_rank ints: the adapter's row ids
//     of B, fetched with the rank. A thread owns VEC columns of row i and loads its share of the rank rows
//     of B (rows ty, ty + blockDim.y, ..., 8 at a time, all in flight), the shares are summed in shared
//     memory and threadIdx.y == 0 adds the sum to out (loaded up front).
//   Both bgmv kernels load the row's adapter and the first blockDim entries of lora_ranks together, so
//   the weights wait for the adapter, then its row ids, then the rows (an adapter's rows can be anywhere).
//   lora_sgmv_shrink_mma<T, MT, NG> (sgmv, Bf16 / Fp16, 16-byte aligned, sm_80+): tensor cores
//     (mma.sync m16n8k16, fp32 accumulation; the products of two 16-bit floats are exact in fp32). A block
//     owns a tile of 16 * MT rows and 8 * NG rank rows (grid (row tiles, rank groups)); for each segment
//     with an adapter that overlaps the tile, its warps split h_in into 64-element chunks, streamed
//     through a per-warp cp.async ring in dynamic shared memory (a permutation of k shared by both
//     operands lets every lane copy 16 contiguous bytes that it then feeds to the mma itself), and the
//     warps' partial tiles are summed in shared memory in warp order (deterministic). Each lane loads the
//     row id of its rank row once per (segment, rank group). x is read once per rank group; A once per
//     row tile (from L2 after the first).
//   lora_sgmv_expand_mma<T> (sgmv, Bf16 / Fp16, 16-byte aligned, sm_80+): tensor cores (mma.sync m16n8k8
//     tf32). y is split into two tf32 terms (hi + lo carry 22 significant bits, an error of ~2^-22 |y|, far
//     below the output's rounding; y is never rounded to the model dtype); B (bf16 or fp16) is exact in
//     tf32. A block owns 16 rows and blockDim.y chunks of 64 columns (one per warp; grid (row tiles, column
//     blocks)); a permutation of the output columns lets each lane load 16 contiguous bytes of B and own
//     16 contiguous columns of out, which it loads before the products and stores once. A warp loads 32
//     row ids of B at a time (one per lane) and hands them round with shuffles.
//   Both sgmv kernels find the segments overlapping their row tile by one pass of the block over
//     segment_indptr (so their cost grows with num_segments / blockDim, which is small for prefill). The
//     wrapper sends batches of short segments (fewer than 8 rows per segment on average) to the generic
//     kernels below instead, since each (tile, segment) pair re-reads the adapter's weights.
//   lora_shrink<T, VEC, 4> and lora_expand<T, VEC, 4> (sgmv when the mma kernels don't apply: fp32,
//     unaligned, short segments, or pre-sm_80): the generic kernels, below; their launch shapes:
//     lora_shrink<T, VEC, TOK>: grid (ceil(num_tokens / TOK), rank_tile_blocks),
//     block (threads_per_row in {32, 64, 128, 256}, rank_rows), at most 256 threads.
//     A block handles TOK rows of x and loops over tiles of rank_rows rank rows (tile blockIdx.y, then
//     every gridDim.y-th, up to the rows' largest rank); the blockDim.x threads of one rank row split
//     h_in, then reduce (warp shuffles, then shared memory across the row's warps). gridDim.y is
//     ceil(max_lora_rank / rank_rows) for few tokens, fewer when there are enough blocks to fill the GPU.
//     lora_expand<T, VEC, TOK>: grid (ceil(num_tokens / TOK), ceil(h_out / (VEC * blockDim.x))),
//     block (column threads in {32, 64}, rank_splits), at most 256 threads. A thread owns VEC columns of
//     TOK rows and loops over its share of the rank (threadIdx.y takes rank rows
//     [ty * ceil(r / rank_splits), ...)), reading each B row's columns contiguously across the block; the
//     shares are summed in shared memory and threadIdx.y == 0 adds the sum to out (loaded up front).
//     TOK (4) fuses the block's rows when they share an adapter, so each A / B vector is loaded once for
//     TOK rows; a block whose rows differ in adapter or rank computes them one row at a time. A block
//     returns at once when none of its rows needs any of its rank rows (rank 0 costs one lookup).

#define LORA_MAX_THREADS 256  // blockDim.x * blockDim.y <= 256 except lora_sgmv_shrink_mma<T, 1, 1>
#define LORA_MAX_WARPS (LORA_MAX_THREADS / 32)
#define LORA_SHRINK_RANK_ROWS 4  // rank rows per lora_bgmv_shrink block
#define LORA_SHRINK_CHUNKS 2  // vectors of x per lora_bgmv_shrink thread and step
// lora_bgmv_shrink's cp.async staging (16-byte vectors): LORA_SHRINK_STAGE vectors per thread
#define LORA_SHRINK_STAGE (LORA_SHRINK_CHUNKS * (LORA_SHRINK_RANK_ROWS + 1))
#define LORA_EXPAND_ROWS_IN_FLIGHT 8  // rank rows of B per thread loaded at once by lora_bgmv_expand
// PTX helpers, one instruction each (kept apart so the conversions and products are easy to audit).
__device__ __forceinline__ float lora_f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short lora_f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// d[0..3] += A (16 x 16, fragments a[0..3]) * B (16 x 8, fragments b[0..1]); PTX ISA "mma.m16n8k16".
__device__ __forceinline__ void lora_mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void lora_mma_f16_16816(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d[0..3] += A (16 x 8 tf32, a[0..3]) * B (8 x 8 tf32, b[0..1]); PTX ISA "mma.m16n8k8" (.tf32).
__device__ __forceinline__ void lora_mma_tf32_1688(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

struct Bf16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float to_float(storage h) {
    return __uint_as_float(static_cast<unsigned int>(h) << 16);
  }
  // Round to nearest even, NaN to the canonical quiet NaN: the same bits as torch's float -> bfloat16.
  static __device__ __forceinline__ storage from_float(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<storage>(0x7fc0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<storage>(u >> 16);
  }
  static __device__ __forceinline__ void mma_16816(float* d, const unsigned int* a, const unsigned int* b) {
    lora_mma_bf16_16816(d, a, b);
  }
};

struct Fp16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float to_float(storage h) { return lora_f16_to_f32(h); }
  static __device__ __forceinline__ storage from_float(float f) { return lora_f32_to_f16(f); }
  static __device__ __forceinline__ void mma_16816(float* d, const unsigned int* a, const unsigned int* b) {
    lora_mma_f16_16816(d, a, b);
  }
};

struct Fp32 {
  typedef float storage;
  static __device__ __forceinline__ float to_float(storage f) { return f; }
  static __device__ __forceinline__ storage from_float(float f) { return f; }
};

// VEC elements loaded or stored as one access (16 bytes when VEC * sizeof(S) == 16).
template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Vec {
  S v[VEC];
};

// Global loads that return zeros where `pred` is false, as inline PTX: the compiler keeps PTX loads
// where they are written, so a loop that loads everything first really has all its loads in flight
// before the first use (the compiler interleaves plain C++ loads under a condition with the arithmetic).
// ".nc": read-only data (x, the pool, the row tables, y); never used for `out`.
__device__ __forceinline__ void lora_ldg16(unsigned int* r, const void* p, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n"
      " mov.b32 %3, 0;\n @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "l"(p), "r"(static_cast<int>(pred)));
}

__device__ __forceinline__ unsigned int lora_ldg4(const void* p, bool pred) {
  unsigned int r;
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0;\n @p ld.global.nc.u32 %0, [%1];\n}\n"
               : "=r"(r)
               : "l"(p), "r"(static_cast<int>(pred)));
  return r;
}

__device__ __forceinline__ unsigned short lora_ldg2(const void* p, bool pred) {
  unsigned short r;
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b16 %0, 0;\n @p ld.global.nc.u16 %0, [%1];\n}\n"
               : "=h"(r)
               : "l"(p), "r"(static_cast<int>(pred)));
  return r;
}

template <typename V>
__device__ __forceinline__ V zero_vec() {
  V z;
#pragma unroll
  for (int j = 0; j < static_cast<int>(sizeof(z.v) / sizeof(z.v[0])); ++j) z.v[j] = 0;
  return z;
}

// 16 bytes from global to shared memory, asynchronously (cp.async, sm_80+), or zeros without reading
// global memory when !pred. Completion: lora_cp_async_commit() closes a group of copies and
// lora_cp_async_wait<N>() waits until at most N groups are pending; a thread then reads the shared
// memory its own copies wrote. Loads staged this way are all in flight before the first use: ptxas
// cannot move the arithmetic between them, as it does with register loads (it interleaved 16-byte
// register loads with the FMAs / mma that consume them after the first four or five).
__device__ __forceinline__ void lora_cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  unsigned int* d = static_cast<unsigned int*>(smem);
  const unsigned int* g = static_cast<const unsigned int*>(gmem);
  for (int q = 0; q < 4; ++q) d[q] = pred ? g[q] : 0u;
#else
  asm volatile(
      "{\n .reg .u64 sa64;\n .reg .u32 sa;\n cvta.to.shared.u64 sa64, %0;\n cvt.u32.u64 sa, sa64;\n"
      " cp.async.cg.shared.global [sa], [%1], 16, %2;\n}\n" ::"l"(smem),
      "l"(gmem), "r"(pred ? 16 : 0)
      : "memory");
#endif
}

__device__ __forceinline__ void lora_cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void lora_cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The block's dynamic shared memory (launch parameter shared_mem), 16-byte aligned.
__device__ __forceinline__ Vec<unsigned int, 4>* lora_dynamic_smem() {
  extern __shared__ Vec<unsigned int, 4> lora_smem[];
  return lora_smem;
}


// load_vec(p, pred): *p, or zeros when !pred, through the PTX loads above (one access of 16, 4 or 2 bytes).
template <typename S, int VEC>
struct VecLoad;

template <>
struct VecLoad<unsigned short, 8> {
  static __device__ __forceinline__ Vec<unsigned short, 8> load(const Vec<unsigned short, 8>* p, bool pred) {
    unsigned int w[4];
    lora_ldg16(w, p, pred);
    Vec<unsigned short, 8> v;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v.v[2 * q] = static_cast<unsigned short>(w[q] & 0xffffu);
      v.v[2 * q + 1] = static_cast<unsigned short>(w[q] >> 16);
    }
    return v;
  }
};

template <>
struct VecLoad<float, 4> {
  static __device__ __forceinline__ Vec<float, 4> load(const Vec<float, 4>* p, bool pred) {
    unsigned int w[4];
    lora_ldg16(w, p, pred);
    Vec<float, 4> v;
#pragma unroll
    for (int q = 0; q < 4; ++q) v.v[q] = __uint_as_float(w[q]);
    return v;
  }
};

template <>
struct VecLoad<unsigned int, 4> {
  static __device__ __forceinline__ Vec<unsigned int, 4> load(const Vec<unsigned int, 4>* p, bool pred) {
    Vec<unsigned int, 4> v;
    lora_ldg16(v.v, p, pred);
    return v;
  }
};

template <>
struct VecLoad<unsigned short, 1> {
  static __device__ __forceinline__ Vec<unsigned short, 1> load(const Vec<unsigned short, 1>* p, bool pred) {
    Vec<unsigned short, 1> v;
    v.v[0] = lora_ldg2(p, pred);
    return v;
  }
};

template <>
struct VecLoad<float, 1> {
  static __device__ __forceinline__ Vec<float, 1> load(const Vec<float, 1>* p, bool pred) {
    Vec<float, 1> v;
    v.v[0] = __uint_as_float(lora_ldg4(p, pred));
    return v;
  }
};

template <typename S, int VEC>
__device__ __forceinline__ Vec<S, VEC> load_vec(const Vec<S, VEC>* p, bool pred) {
  return VecLoad<S, VEC>::load(p, pred);
}

__device__ __forceinline__ float load_f32(const float* p, bool pred) {
  return __uint_as_float(lora_ldg4(p, pred));
}

// ------------------------------------------------------------------------------------------------
// The pool and its row tables.

// The contribution of a rank row whose row id is not a row of its view (see the header): never read,
// its products are NaN.
__device__ __forceinline__ float lora_nan() { return __int_as_float(0x7fc00000); }

// Whether `id` names a row of a view with `num_rows` rows.
__device__ __forceinline__ bool lora_row_ok(long long id, long long num_rows) { return id >= 0 && id < num_rows; }

// Entry k of adapter g's row table, or 0 without any load when !pred (g may then be -1).
__device__ __forceinline__ long long lora_row_id(const int* rows, long long rows_stride, long long g, long long k,
                                                 bool pred) {
  return static_cast<int>(lora_ldg4(rows + (pred ? g * rows_stride + k : 0), pred));
}

// The rank of adapter g clamped to [0, max_lora_rank]; 0 (skip) when g is outside [0, num_adapters).
__device__ __forceinline__ int lora_adapter_rank(long long g, const int* lora_ranks, long long num_adapters,
                                                 long long max_lora_rank) {
  if (g < 0 || g >= num_adapters) return 0;
  const long long r = lora_ranks[g];
  return static_cast<int>(r < 0 ? 0 : (r > max_lora_rank ? max_lora_rank : r));
}

// ------------------------------------------------------------------------------------------------
// Generic sgmv (short segments, fp32, unaligned rows, pre-sm_80).

// Adapter and rank of row i (adapter -1 / rank 0 when the row is skipped): the segment holding row i.
__device__ __forceinline__ void resolve_row(long long i, long long num_tokens, const int* segment_indptr,
                                            const int* segment_adapters, long long num_segments,
                                            const int* lora_ranks, long long num_adapters,
                                            long long max_lora_rank, int* adapter_out, int* rank_out) {
  int adapter = -1;
  int rank = 0;
  if (i < num_tokens) {
    // First s with segment_indptr[s + 1] > i; then segment_indptr[s] <= i (empty segments skipped).
    long long lo = 0, hi = num_segments;
    while (lo < hi) {
      const long long mid = (lo + hi) >> 1;
      if (segment_indptr[mid + 1] <= i) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    if (lo < num_segments) {
      const long long g = segment_adapters[lo];
      rank = lora_adapter_rank(g, lora_ranks, num_adapters, max_lora_rank);
      if (rank > 0) adapter = static_cast<int>(g);
    }
  }
  *adapter_out = adapter;
  *rank_out = rank;
}

// Resolves the block's TOK rows into shared memory; returns the largest rank among them and whether
// all TOK rows share one adapter with a nonzero rank (then they can be fused).
template <int TOK>
__device__ __forceinline__ int resolve_block_rows(long long row0, long long num_tokens, const int* segment_indptr,
                                                  const int* segment_adapters, long long num_segments,
                                                  const int* lora_ranks, long long num_adapters,
                                                  long long max_lora_rank, int* s_adapter, int* s_rank,
                                                  bool* same_adapter) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (tid < TOK) {
    resolve_row(row0 + tid, num_tokens, segment_indptr, segment_adapters, num_segments, lora_ranks,
                num_adapters, max_lora_rank, &s_adapter[tid], &s_rank[tid]);
  }
  __syncthreads();
  int group_rank = 0;
  bool same = s_rank[0] > 0;
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    group_rank = s_rank[t] > group_rank ? s_rank[t] : group_rank;
    same = same && s_adapter[t] == s_adapter[0] && s_rank[t] == s_rank[0];
  }
  *same_adapter = same;
  return group_rank;
}

// acc[t] += this thread's share of dot(a_row, x_rows[t]) over n_vec vectors, for NT rows of x.
template <typename T, int VEC, int NT>
__device__ __forceinline__ void shrink_dot(const typename T::storage* a_row,
                                           const typename T::storage* const* x_rows, long long n_vec,
                                           float* acc) {
  typedef Vec<typename T::storage, VEC> V;
  constexpr int U = NT == 1 ? 4 : 2;  // vectors in flight per thread per row of x
  const V* a = reinterpret_cast<const V*>(a_row);
  const V* xs[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) xs[t] = reinterpret_cast<const V*>(x_rows[t]);
  const long long step = blockDim.x;
  long long v = threadIdx.x;
  for (; v + (U - 1) * step < n_vec; v += U * step) {
    V av[U];
    V xv[NT][U];
#pragma unroll
    for (int u = 0; u < U; ++u) av[u] = a[v + u * step];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int u = 0; u < U; ++u) xv[t][u] = xs[t][v + u * step];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float aj = T::to_float(av[u].v[j]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = fmaf(aj, T::to_float(xv[t][u].v[j]), acc[t]);
      }
    }
  }
  for (; v < n_vec; v += step) {
    const V av = a[v];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const V xv = xs[t][v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[t] = fmaf(T::to_float(av.v[j]), T::to_float(xv.v[j]), acc[t]);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// y[rows, k] for the block's TOK rows and the rank rows k of its tiles (see the header). The rank row's
// id is loaded by each of its threads (one address per blockDim.x threads).
template <typename T, int VEC, int TOK>
__global__ void lora_shrink(const typename T::storage* __restrict__ x, long long x_stride,
                            const typename T::storage* __restrict__ a_view, long long a_num_rows,
                            const int* __restrict__ a_rows, long long rows_stride,
                            const int* __restrict__ segment_indptr, const int* __restrict__ segment_adapters,
                            long long num_segments, const int* __restrict__ lora_ranks, long long num_adapters,
                            float* __restrict__ y, long long y_stride, long long num_tokens, long long h_in,
                            long long max_lora_rank) {
  typedef typename T::storage S;
  __shared__ int s_adapter[TOK];
  __shared__ int s_rank[TOK];
  __shared__ float s_partial[LORA_MAX_WARPS][TOK];

  const long long row0 = static_cast<long long>(blockIdx.x) * TOK;
  bool same_adapter;
  const int group_rank =
      resolve_block_rows<TOK>(row0, num_tokens, segment_indptr, segment_adapters, num_segments, lora_ranks,
                              num_adapters, max_lora_rank, s_adapter, s_rank, &same_adapter);
  const long long n_vec = h_in / VEC;
  // Rank tiles blockIdx.y, blockIdx.y + gridDim.y, ... up to the largest rank among the block's rows
  // (uniform over the block); later tiles re-read the block's rows of x from L1.
  for (int k0 = blockIdx.y * blockDim.y; k0 < group_rank; k0 += gridDim.y * blockDim.y) {
    const int k = k0 + threadIdx.y;
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = 0.0f;
    if (TOK > 1 && same_adapter) {
      if (k < s_rank[0]) {
        const long long id = lora_row_id(a_rows, rows_stride, s_adapter[0], k, true);
        if (lora_row_ok(id, a_num_rows)) {
          const S* x_rows[TOK];
#pragma unroll
          for (int t = 0; t < TOK; ++t) x_rows[t] = x + (row0 + t) * x_stride;
          shrink_dot<T, VEC, TOK>(a_view + id * h_in, x_rows, n_vec, acc);
        } else {
#pragma unroll
          for (int t = 0; t < TOK; ++t) acc[t] = lora_nan();
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        if (k < s_rank[t]) {
          const long long id = lora_row_id(a_rows, rows_stride, s_adapter[t], k, true);
          if (lora_row_ok(id, a_num_rows)) {
            const S* x_row = x + (row0 + t) * x_stride;
            shrink_dot<T, VEC, 1>(a_view + id * h_in, &x_row, n_vec, &acc[t]);
          } else {
            acc[t] = lora_nan();
          }
        }
      }
    }

#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = warp_sum(acc[t]);
    if (blockDim.x > 32) {  // the row spans several warps: combine their sums in shared memory
      const int tid = threadIdx.y * blockDim.x + threadIdx.x;
      if ((tid & 31) == 0) {
#pragma unroll
        for (int t = 0; t < TOK; ++t) s_partial[tid >> 5][t] = acc[t];
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        const int w0 = tid >> 5;
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
          float sum = 0.0f;
          for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) sum += s_partial[w0 + w][t];
          acc[t] = sum;
        }
      }
      __syncthreads();  // s_partial is rewritten by the next tile
    }
    if (threadIdx.x == 0) {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        if (k < s_rank[t]) y[(row0 + t) * y_stride + k] = acc[t];
      }
    }
  }
}

// acc[t][j] += sum_k y_rows[t][k] * B[k].v[j] for k in [k_begin, k_end), for VEC columns of NT rows, where
// B[k] = b + ids[k] * n_vec is rank row k of the adapter (b points at this thread's column vector of view
// row 0; ids at the adapter's row table, k_end <= its rank). U row ids, then U rows of B, in flight at once.
template <typename T, int VEC, int NT>
__device__ __forceinline__ void expand_accumulate(const Vec<typename T::storage, VEC>* b, long long n_vec,
                                                  long long b_num_rows, const int* ids, int k_begin, int k_end,
                                                  const float* const* y_rows, float (*acc)[VEC]) {
  typedef Vec<typename T::storage, VEC> V;
  constexpr int U = NT == 1 ? 8 : 4;  // rank rows of B in flight per thread
  for (int k = k_begin; k < k_end; k += U) {
    long long id[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in_rank = k + u < k_end;
      id[u] = lora_row_id(ids, 0, 0, k + u, in_rank);
      ok[u] = in_rank && lora_row_ok(id[u], b_num_rows);
    }
    V bv[U];
    float yv[NT][U];
#pragma unroll
    for (int u = 0; u < U; ++u) bv[u] = load_vec(b + (ok[u] ? id[u] : 0) * n_vec, ok[u]);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in_rank = k + u < k_end;
        yv[t][u] = load_f32(y_rows[t] + k + u, in_rank);
        if (in_rank && !ok[u]) yv[t][u] = lora_nan();  // a corrupt row id: NaN, never a read
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float bj = T::to_float(bv[u].v[j]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t][j] = fmaf(yv[t][u], bj, acc[t][j]);
      }
    }
  }
}

// out[rows, o + c] += y[rows, :r] @ B[:r, c] for the block's TOK rows and its columns (see the header).
template <typename T, int VEC, int TOK>
__global__ void lora_expand(const float* __restrict__ y, long long y_stride,
                            const typename T::storage* __restrict__ b_view, long long b_num_rows,
                            const int* __restrict__ b_rows, long long rows_stride,
                            const int* __restrict__ segment_indptr, const int* __restrict__ segment_adapters,
                            long long num_segments, const int* __restrict__ lora_ranks, long long num_adapters,
                            typename T::storage* __restrict__ out, long long out_stride, long long out_offset,
                            long long num_tokens, long long h_out, long long max_lora_rank) {
  typedef Vec<typename T::storage, VEC> V;
  __shared__ int s_adapter[TOK];
  __shared__ int s_rank[TOK];
  __shared__ float s_partial[LORA_MAX_THREADS * TOK * VEC];

  const long long row0 = static_cast<long long>(blockIdx.x) * TOK;
  bool same_adapter;
  const int group_rank =
      resolve_block_rows<TOK>(row0, num_tokens, segment_indptr, segment_adapters, num_segments, lora_ranks,
                              num_adapters, max_lora_rank, s_adapter, s_rank, &same_adapter);
  if (group_rank == 0) return;  // uniform over the block: no row has an adapter
  const long long n_vec = h_out / VEC;
  const long long v = static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool column_ok = v < n_vec;  // threads past h_out still take part in the reduction's barrier
  const bool writer = column_ok && threadIdx.y == 0;
  const V* b_col = reinterpret_cast<const V*>(b_view) + v;  // this thread's columns of view row 0

  // Load the outputs first so their latency overlaps the loads of B.
  V* out_vecs[TOK];
  V out_old[TOK];
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    out_vecs[t] = reinterpret_cast<V*>(out + (row0 + t) * out_stride + out_offset) + v;
    if (writer && s_rank[t] > 0) out_old[t] = *out_vecs[t];
  }

  float acc[TOK][VEC];
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[t][j] = 0.0f;
  }
  if (column_ok) {
    if (TOK > 1 && same_adapter) {
      const int r = s_rank[0];
      const int chunk = (r + blockDim.y - 1) / blockDim.y;  // rank rows per threadIdx.y
      const int k_begin = threadIdx.y * chunk;
      const int k_end = k_begin + chunk < r ? k_begin + chunk : r;
      const float* y_rows[TOK];
#pragma unroll
      for (int t = 0; t < TOK; ++t) y_rows[t] = y + (row0 + t) * y_stride;
      const int* ids = b_rows + static_cast<long long>(s_adapter[0]) * rows_stride;
      expand_accumulate<T, VEC, TOK>(b_col, n_vec, b_num_rows, ids, k_begin, k_end, y_rows, acc);
    } else {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        const int r = s_rank[t];
        if (r == 0) continue;
        const int chunk = (r + blockDim.y - 1) / blockDim.y;
        const int k_begin = threadIdx.y * chunk;
        const int k_end = k_begin + chunk < r ? k_begin + chunk : r;
        const float* y_row = y + (row0 + t) * y_stride;
        const int* ids = b_rows + static_cast<long long>(s_adapter[t]) * rows_stride;
        expand_accumulate<T, VEC, 1>(b_col, n_vec, b_num_rows, ids, k_begin, k_end, &y_row, &acc[t]);
      }
    }
  }

  if (blockDim.y > 1) {  // the rank is split over threadIdx.y: sum the parts in shared memory
    const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    if (ty > 0) {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s_partial[((t * VEC + j) * by + ty) * bx + tx] = acc[t][j];
      }
    }
    __syncthreads();
    if (ty == 0) {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          for (int g = 1; g < by; ++g) acc[t][j] += s_partial[((t * VEC + j) * by + g) * bx + tx];
        }
      }
    }
  }
  if (!writer) return;
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (s_rank[t] > 0) {
      V o = out_old[t];
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = T::from_float(T::to_float(o.v[j]) + acc[t][j]);
      *out_vecs[t] = o;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// bgmv: one adapter per row (decode).

// Row i's adapter g (-1 when outside [0, num_adapters)), as every thread loads it, and the start of the
// block's copy of the first blockDim entries of lora_ranks into s_ranks (loaded together, so that the
// rank usually comes from shared memory rather than a second dependent load). The caller issues the
// loads that need only g (row ids), then __syncthreads(), then bgmv_rank.
__device__ __forceinline__ int bgmv_adapter(long long i, const int* row_adapter, const int* lora_ranks,
                                            long long num_adapters, int* s_ranks) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const long long nthreads = blockDim.x * blockDim.y;
  const long long table = num_adapters < nthreads ? num_adapters : nthreads;
  if (tid < table) s_ranks[tid] = lora_ranks[tid];
  const long long g = row_adapter[i];
  return g >= 0 && g < num_adapters ? static_cast<int>(g) : -1;
}

// The rank of adapter g (from bgmv_adapter, after the barrier), clamped to [0, max_lora_rank].
__device__ __forceinline__ int bgmv_rank(int g, const int* lora_ranks, long long num_adapters,
                                         long long max_lora_rank, const int* s_ranks) {
  if (g < 0) return 0;
  const long long nthreads = blockDim.x * blockDim.y;
  const long long table = num_adapters < nthreads ? num_adapters : nthreads;
  const long long r = g < table ? s_ranks[g] : lora_ranks[g];
  return static_cast<int>(r < 0 ? 0 : (r > max_lora_rank ? max_lora_rank : r));
}

// y[i, k0:k0 + 4] for the rank group k0 = 4 * blockIdx.y (then + 4 * gridDim.y, ...) of row i. Each
// step, thread tid takes vectors tid and tid + blockDim of x and of the group's 4 A rows: 10 loads, all
// in flight before the first product (16-byte vectors go through shared memory with cp.async: dynamic
// shared memory of LORA_SHRINK_STAGE * blockDim vectors; 1-element vectors are plain loads). The first
// group's 4 row ids are loaded before the barrier that yields the rank (entries below max_lora_rank:
// inside the table; only those below the rank are used).
template <typename T, int VEC>
__global__ void __launch_bounds__(LORA_MAX_THREADS)
    lora_bgmv_shrink(const typename T::storage* __restrict__ x, long long x_stride,
                     const typename T::storage* __restrict__ a_view, long long a_num_rows,
                     const int* __restrict__ a_rows, long long rows_stride, const int* __restrict__ row_adapter,
                     const int* __restrict__ lora_ranks, long long num_adapters, float* __restrict__ y,
                     long long y_stride, long long num_tokens, long long h_in, long long max_lora_rank) {
  typedef Vec<typename T::storage, VEC> V;
  constexpr int RW = LORA_SHRINK_RANK_ROWS;
  constexpr int CH = LORA_SHRINK_CHUNKS;
  constexpr bool ASYNC = sizeof(V) == 16;
  __shared__ int s_ranks[LORA_MAX_THREADS];
  __shared__ float s_part[LORA_MAX_WARPS][RW];

  const long long i = blockIdx.x;  // grid.x == num_tokens
  const int adapter = bgmv_adapter(i, row_adapter, lora_ranks, num_adapters, s_ranks);
  const int k_first = blockIdx.y * RW;
  int ids[RW];  // row ids are int32; a row's offset id * h_in is formed in 64 bits below
#pragma unroll
  for (int w = 0; w < RW; ++w) {
    const bool in_table = adapter >= 0 && k_first + w < max_lora_rank;
    ids[w] = static_cast<int>(lora_row_id(a_rows, rows_stride, adapter, k_first + w, in_table));
  }
  __syncthreads();
  const int rank = bgmv_rank(adapter, lora_ranks, num_adapters, max_lora_rank, s_ranks);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const long long n_vec = h_in / VEC;
  const V* x_row = reinterpret_cast<const V*>(x + i * x_stride);
  // Staging slot (c, 0) holds x, (c, 1 + w) A row w, for thread tid at [slot * blockDim + tid].
  V* stage = reinterpret_cast<V*>(lora_dynamic_smem());
  // Rank groups blockIdx.y, blockIdx.y + gridDim.y, ... below the row's rank (uniform over the block).
  for (int k0 = k_first; k0 < rank; k0 += gridDim.y * RW) {
    if (k0 != k_first) {  // a later group (more than 65535 groups): its ids, below the rank only
#pragma unroll
      for (int w = 0; w < RW; ++w)
        ids[w] = static_cast<int>(lora_row_id(a_rows, rows_stride, adapter, k0 + w, k0 + w < rank));
    }
    const V* a_row[RW];
    bool a_ok[RW];
    bool a_bad[RW];
#pragma unroll
    for (int w = 0; w < RW; ++w) {
      const bool in_rank = k0 + w < rank;
      a_ok[w] = in_rank && lora_row_ok(ids[w], a_num_rows);
      a_bad[w] = in_rank && !a_ok[w];
      a_row[w] = reinterpret_cast<const V*>(a_view + static_cast<long long>(a_ok[w] ? ids[w] : 0) * h_in);
    }
    float acc[RW];
#pragma unroll
    for (int w = 0; w < RW; ++w) acc[w] = 0.0f;
    for (long long v0 = tid; v0 < n_vec; v0 += static_cast<long long>(CH) * nthreads) {
      V xv[CH];
      V av[RW][CH];
      if (ASYNC) {
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          const long long v = v0 + static_cast<long long>(c) * nthreads;
          const bool ok = v < n_vec;
          lora_cp_async16(stage + (c * (RW + 1)) * nthreads + tid, x_row + v, ok);
#pragma unroll
          for (int w = 0; w < RW; ++w)
            lora_cp_async16(stage + (c * (RW + 1) + 1 + w) * nthreads + tid, a_row[w] + v, ok && a_ok[w]);
        }
        lora_cp_async_commit();
        lora_cp_async_wait<0>();
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          xv[c] = stage[(c * (RW + 1)) * nthreads + tid];
#pragma unroll
          for (int w = 0; w < RW; ++w) av[w][c] = stage[(c * (RW + 1) + 1 + w) * nthreads + tid];
        }
      } else {
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          const long long v = v0 + static_cast<long long>(c) * nthreads;
          const bool ok = v < n_vec;
          xv[c] = load_vec(x_row + v, ok);
#pragma unroll
          for (int w = 0; w < RW; ++w) av[w][c] = load_vec(a_row[w] + v, ok && a_ok[w]);
        }
      }
#pragma unroll
      for (int c = 0; c < CH; ++c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xf = T::to_float(xv[c].v[j]);
#pragma unroll
          for (int w = 0; w < RW; ++w) acc[w] = fmaf(T::to_float(av[w][c].v[j]), xf, acc[w]);
        }
      }
    }
#pragma unroll
    for (int w = 0; w < RW; ++w) {
      if (a_bad[w]) acc[w] = lora_nan();  // a corrupt row id: NaN, never a read
      acc[w] = warp_sum(acc[w]);
    }
    if (nthreads > 32) {  // combine the warps' sums in shared memory, in warp order
      if ((tid & 31) == 0) {
#pragma unroll
        for (int w = 0; w < RW; ++w) s_part[tid >> 5][w] = acc[w];
      }
      __syncthreads();
      if (tid < RW && k0 + tid < rank) {
        float sum = 0.0f;
        for (int wp = 0; wp < (nthreads >> 5); ++wp) sum += s_part[wp][tid];
        y[i * y_stride + k0 + tid] = sum;
      }
      __syncthreads();  // s_part is rewritten by the next rank group
    } else if (tid == 0) {
#pragma unroll
      for (int w = 0; w < RW; ++w) {
        if (k0 + w < rank) y[i * y_stride + k0 + w] = acc[w];
      }
    }
  }
}

// out[i, o:o + h_out] += y[i, :r] @ B[:r] for row i and the block's columns. Dynamic shared memory:
// max_lora_rank ints, the adapter's row ids of B, fetched before the barrier that yields the rank (the
// whole table row: inside the table; only entries below the rank are used).
template <typename T, int VEC>
__global__ void __launch_bounds__(LORA_MAX_THREADS)
    lora_bgmv_expand(const float* __restrict__ y, long long y_stride,
                     const typename T::storage* __restrict__ b_view, long long b_num_rows,
                     const int* __restrict__ b_rows, long long rows_stride, const int* __restrict__ row_adapter,
                     const int* __restrict__ lora_ranks, long long num_adapters,
                     typename T::storage* __restrict__ out, long long out_stride, long long out_offset,
                     long long num_tokens, long long h_out, long long max_lora_rank) {
  typedef Vec<typename T::storage, VEC> V;
  constexpr int KU = LORA_EXPAND_ROWS_IN_FLIGHT;
  __shared__ int s_ranks[LORA_MAX_THREADS];
  __shared__ float s_part[LORA_MAX_THREADS * VEC];
  int* s_ids = reinterpret_cast<int*>(lora_dynamic_smem());  // [max_lora_rank]

  const long long i = blockIdx.x;  // grid.x == num_tokens
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int adapter = bgmv_adapter(i, row_adapter, lora_ranks, num_adapters, s_ranks);
  if (adapter >= 0) {
    for (long long k = ty * bx + tx; k < max_lora_rank; k += bx * by)
      s_ids[k] = static_cast<int>(lora_row_id(b_rows, rows_stride, adapter, k, true));
  }
  __syncthreads();
  const int rank = bgmv_rank(adapter, lora_ranks, num_adapters, max_lora_rank, s_ranks);
  if (rank == 0) return;  // uniform over the block: the row has no adapter for this module
  const long long n_vec = h_out / VEC;
  const long long v = static_cast<long long>(blockIdx.y) * bx + tx;
  const bool column_ok = v < n_vec;  // threads past h_out still take part in the reduction's barrier
  V* out_vec = reinterpret_cast<V*>(out + i * out_stride + out_offset) + (column_ok ? v : 0);
  V old = zero_vec<V>();
  if (column_ok && ty == 0) old = *out_vec;  // in flight while B is loaded

  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
  if (column_ok) {
    const V* b_col = reinterpret_cast<const V*>(b_view) + v;  // this thread's columns of view row 0
    const float* y_row = y + i * y_stride;
    for (int k0 = ty; k0 < rank; k0 += KU * by) {  // rank rows k0, k0 + by, ..., KU of them at once
      V bv[KU];
      float yv[KU];
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const int k = k0 + u * by;
        const bool in_rank = k < rank;
        const long long id = in_rank ? s_ids[k] : 0;
        const bool ok = in_rank && lora_row_ok(id, b_num_rows);
        bv[u] = load_vec(b_col + (ok ? id : 0) * n_vec, ok);
        yv[u] = load_f32(y_row + k, in_rank);
        if (in_rank && !ok) yv[u] = lora_nan();  // a corrupt row id: NaN, never a read
      }
#pragma unroll
      for (int u = 0; u < KU; ++u) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = fmaf(yv[u], T::to_float(bv[u].v[j]), acc[j]);
      }
    }
  }
  if (by > 1) {  // the rank is split over threadIdx.y: sum the parts in shared memory, in ty order
    if (ty > 0) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s_part[((ty - 1) * VEC + j) * bx + tx] = acc[j];
    }
    __syncthreads();
    if (ty == 0) {
      for (int g = 1; g < by; ++g) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += s_part[((g - 1) * VEC + j) * bx + tx];
      }
    }
  }
  if (ty != 0 || !column_ok) return;
  V o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = T::from_float(T::to_float(old.v[j]) + acc[j]);
  *out_vec = o;
}
// ------------------------------------------------------------------------------------------------
// sgmv on tensor cores (prefill): 16-bit T, 16-byte aligned rows, sm_80+.

#define LORA_MMA_COLS 64  // columns of out per warp in lora_sgmv_expand_mma
#define LORA_MMA_K 64     // elements of h_in per warp chunk in lora_sgmv_shrink_mma
#define LORA_MMA_STAGES 3  // chunks per warp in lora_sgmv_shrink_mma's cp.async ring (2 in flight)
// Warps per lora_sgmv_shrink_mma block at most (the wrapper launches up to these, one per chunk of h_in):
// for its 16 x 8 tile (MT = NG = 1) and for the larger tiles.
#define LORA_MMA_SMALL_TILE_WARPS 16
#define LORA_MMA_TILE_WARPS 8

// Rows [begin, end) of one segment within a row tile, its adapter and its (clamped, nonzero) rank.
struct SegmentRows {
  int begin, end, adapter, rank;
};

// The segments with an adapter that overlap rows [row0, row_end), into s_seg (at most `capacity`:
// non-empty overlaps of disjoint segments with a tile of `capacity` rows), in no particular order (each
// row lies in one segment and is computed the same way whatever the order). One pass of the block over
// the segments; returns the count, the same in every thread.
__device__ __forceinline__ int tile_segments(long long row0, long long row_end, const int* segment_indptr,
                                             const int* segment_adapters, long long num_segments,
                                             const int* lora_ranks, long long num_adapters,
                                             long long max_lora_rank, SegmentRows* s_seg, int capacity,
                                             int* s_count) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const long long nthreads = blockDim.x * blockDim.y;
  if (tid == 0) *s_count = 0;
  __syncthreads();
  for (long long g = tid; g < num_segments; g += nthreads) {  // g: a segment
    const long long p = segment_indptr[g], q = segment_indptr[g + 1];
    const long long a = segment_adapters[g];
    const long long begin = p > row0 ? p : row0, end = q < row_end ? q : row_end;
    if (begin < end) {
      const int r = lora_adapter_rank(a, lora_ranks, num_adapters, max_lora_rank);
      if (r > 0) {
        const int idx = atomicAdd(s_count, 1);
        if (idx < capacity) {  // always, for non-decreasing segment_indptr
          SegmentRows e;
          e.begin = static_cast<int>(begin);
          e.end = static_cast<int>(end);
          e.adapter = static_cast<int>(a);
          e.rank = r;
          s_seg[idx] = e;
        }
      }
    }
  }
  __syncthreads();
  const int count = *s_count;
  return count < capacity ? count : capacity;
}

// Round to the nearest tf32 (10 explicit mantissa bits, ties away from zero); the low 13 bits are 0.
__device__ __forceinline__ unsigned int tf32_bits(float f) {
  return (__float_as_uint(f) + 0x1000u) & 0xffffe000u;
}

// y[rows, n] for the rank rows n of group blockIdx.y (8 * NG of them) and the tile's rows of each
// segment. Block (32, warps): warp w takes the 64-element chunks w, w + warps, ... of h_in. Lane
// (g, t) = (lane / 4, lane % 4) loads the 16 bytes at elements 8t and 32 + 8t of a chunk (halves 0 and
// 1) for rows g and g + 8 of each m tile (x) and for rank row g of each n tile (A). The chunk's k16 step
// j (0..3) takes half j / 2, and its 32-bit words 2 (j % 2) and 2 (j % 2) + 1 as the k slots
// {2t, 2t + 1} and {2t + 8, 2t + 9} of both operands: one permutation of k for both, so every product
// pairs x[., k] with A[., k] and each k of the chunk is summed once. The loads are cp.async copies into
// the warp's LORA_MMA_STAGES-deep ring in dynamic shared memory (LORA_MMA_STAGES * (4 MT + 2 NG) * 32
// vectors of 16 bytes per warp), LORA_MMA_STAGES - 1 chunks ahead of the products; each lane reads back
// only what it copied, so the warps never wait for each other until the final sum. Lane (g, t) loads the
// row id of rank row nb + 8 nt + g once per (segment, rank group); a corrupt id (see the header) is not
// read, and a ballot turns that rank row's accumulators into NaN in every lane that holds one.
template <typename T, int MT, int NG>
__global__ void __launch_bounds__(MT * NG == 1 ? 32 * LORA_MMA_SMALL_TILE_WARPS : 32 * LORA_MMA_TILE_WARPS)
    lora_sgmv_shrink_mma(const typename T::storage* __restrict__ x, long long x_stride,
                         const typename T::storage* __restrict__ a_view, long long a_num_rows,
                         const int* __restrict__ a_rows, long long rows_stride,
                         const int* __restrict__ segment_indptr, const int* __restrict__ segment_adapters,
                         long long num_segments, const int* __restrict__ lora_ranks, long long num_adapters,
                         float* __restrict__ y, long long y_stride, long long num_tokens, long long h_in,
                         long long max_lora_rank) {
  typedef Vec<unsigned int, 4> W4;  // 16 bytes: 8 elements
  constexpr int BM = 16 * MT;
  constexpr int MAX_WARPS = MT * NG == 1 ? LORA_MMA_SMALL_TILE_WARPS : LORA_MMA_TILE_WARPS;
  constexpr int NV = MT * NG * 4 * 32;  // fragment values of a warp's tile
  constexpr int NVEC = 4 * MT + 2 * NG;  // 16-byte vectors per lane and chunk: x (m tile, row, half), A
  constexpr int S = LORA_MMA_STAGES;
  __shared__ SegmentRows s_seg[BM];
  __shared__ int s_count;
  __shared__ float s_red[MAX_WARPS * NV];

  const int lane = threadIdx.x, warp = threadIdx.y, nwarps = blockDim.y;
  const int tid = warp * 32 + lane, nthreads = nwarps * 32;
  const int g = lane >> 2, t = lane & 3;
  const long long row0 = static_cast<long long>(blockIdx.x) * BM;
  const long long row_end = row0 + BM < num_tokens ? row0 + BM : num_tokens;
  const int count = tile_segments(row0, row_end, segment_indptr, segment_adapters, num_segments, lora_ranks,
                                  num_adapters, max_lora_rank, s_seg, BM, &s_count);
  const long long nchunks = (h_in + LORA_MMA_K - 1) / LORA_MMA_K;
  const int my_chunks = warp < nchunks ? static_cast<int>((nchunks - 1 - warp) / nwarps) + 1 : 0;
  W4* ring = lora_dynamic_smem() + static_cast<long long>(warp) * S * NVEC * 32 + lane;

  for (int e = 0; e < count; ++e) {
    const SegmentRows seg = s_seg[e];
    for (int nb = blockIdx.y * 8 * NG; nb < seg.rank; nb += gridDim.y * 8 * NG) {
      const W4* xr[MT][2];
      bool x_ok[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long long row = row0 + 16 * mt + 8 * h + g;
          x_ok[mt][h] = row >= seg.begin && row < seg.end;
          xr[mt][h] = reinterpret_cast<const W4*>(x + (x_ok[mt][h] ? row : seg.begin) * x_stride);
        }
      }
      const W4* ar[NG];
      bool a_ok[NG];
      bool a_bad[NG];
#pragma unroll
      for (int nt = 0; nt < NG; ++nt) {
        const int n = nb + 8 * nt + g;
        const bool in_rank = n < seg.rank;
        const long long id = lora_row_id(a_rows, rows_stride, seg.adapter, n, in_rank);
        a_ok[nt] = in_rank && lora_row_ok(id, a_num_rows);
        a_bad[nt] = in_rank && !a_ok[nt];
        ar[nt] = reinterpret_cast<const W4*>(a_view + (a_ok[nt] ? id : 0) * h_in);
      }
      // Copies of this warp's chunk i into ring slot i % S, as one cp.async group (empty past the end).
      auto issue = [&](int i) {
        if (i < my_chunks) {
          const long long c = warp + static_cast<long long>(i) * nwarps;
          W4* slot = ring + (i % S) * NVEC * 32;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const long long k = c * LORA_MMA_K + half * 32 + t * 8;  // first element of the 16 bytes
            const bool k_ok = k < h_in;
            const long long q = k >> 3;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
              for (int h = 0; h < 2; ++h)
                lora_cp_async16(slot + ((mt * 2 + h) * 2 + half) * 32, xr[mt][h] + q, k_ok && x_ok[mt][h]);
            }
#pragma unroll
            for (int nt = 0; nt < NG; ++nt)
              lora_cp_async16(slot + (4 * MT + nt * 2 + half) * 32, ar[nt] + q, k_ok && a_ok[nt]);
          }
        }
        lora_cp_async_commit();
      };
      float acc[MT][NG][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NG; ++nt) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.0f;
        }
      }
#pragma unroll
      for (int i = 0; i < S - 1; ++i) issue(i);
      for (int i = 0; i < my_chunks; ++i) {
        issue(i + S - 1);
        lora_cp_async_wait<S - 1>();  // chunk i has landed
        const W4* slot = ring + (i % S) * NVEC * 32;
        W4 xv[MT][2][2];  // [m tile][row g / g + 8][16-byte half]
        W4 av[NG][2];     // [n tile][16-byte half]
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int half = 0; half < 2; ++half) xv[mt][h][half] = slot[((mt * 2 + h) * 2 + half) * 32];
          }
        }
#pragma unroll
        for (int nt = 0; nt < NG; ++nt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) av[nt][half] = slot[(4 * MT + nt * 2 + half) * 32];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // the chunk's four k16 steps
          const int half = j >> 1, w0 = (j & 1) * 2;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const unsigned int a[4] = {xv[mt][0][half].v[w0], xv[mt][1][half].v[w0], xv[mt][0][half].v[w0 + 1],
                                       xv[mt][1][half].v[w0 + 1]};
#pragma unroll
            for (int nt = 0; nt < NG; ++nt) {
              const unsigned int b[2] = {av[nt][half].v[w0], av[nt][half].v[w0 + 1]};
              T::mma_16816(acc[mt][nt], a, b);
            }
          }
        }
      }
      lora_cp_async_wait<0>();  // only empty groups remain; the ring is free for the next pass
#pragma unroll
      for (int nt = 0; nt < NG; ++nt) {
        // Bit 4 g' + t' is set when rank row nb + 8 nt + g' has a corrupt id; accumulator q of this lane
        // holds rank row nb + 8 nt + 2 t + (q & 1). The warp is converged here (uniform trip counts).
        const unsigned int bad = __ballot_sync(0xffffffffu, a_bad[nt]);
        if (bad != 0u) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if ((bad >> (4 * (2 * t + (q & 1)))) & 1u) acc[mt][nt][q] = lora_nan();
            }
          }
        }
      }
      // Sum the warps' tiles (shared memory, warp order) and store the rows and ranks in range.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NG; ++nt) {
#pragma unroll
          for (int q = 0; q < 4; ++q) s_red[warp * NV + ((mt * NG + nt) * 4 + q) * 32 + lane] = acc[mt][nt][q];
        }
      }
      __syncthreads();
      for (int o = tid; o < NV; o += nthreads) {
        float sum = 0.0f;
        for (int w = 0; w < nwarps; ++w) sum += s_red[w * NV + o];
        const int idx = o >> 5, ln = o & 31;
        const int q = idx & 3, nt = (idx >> 2) % NG, mt = (idx >> 2) / NG;
        const long long row = row0 + 16 * mt + 8 * (q >> 1) + (ln >> 2);
        const int n = nb + 8 * nt + 2 * (ln & 3) + (q & 1);
        if (row >= seg.begin && row < seg.end && n < seg.rank) y[row * y_stride + n] = sum;
      }
      __syncthreads();  // s_red is rewritten by the next pass
    }
  }
}

// out[rows, o + c] += y[rows, :r] @ B[:r, c] for the 64 columns c of each warp (chunk
// blockIdx.y * blockDim.y + warp) and the 16 rows of the tile in each segment. Lane (g, t) loads the 8
// columns 8g..8g+7 of the chunk (16 bytes) from B rows k + 2t and k + 2t + 1 (k slots t and t + 4 of a
// k8 step), and column 8g + j feeds n tile j as its column g. So n tile j's output column 2t (2t + 1)
// is chunk column 16t + j (16t + 8 + j): lane (g, t) ends up with columns 16t..16t+15 of rows g and
// g + 8, two 16-byte vectors per row. y (fp32) enters as hi + lo tf32 terms. The lane's out vectors are
// loaded before the segment search, so their latency overlaps it: out rows of the tile without an adapter
// are read (never written) too, the one exception to "no loads" for skipped rows. The warp loads the
// segment's row ids of B 32 at a time, lane l holding rank row kb + l, and each lane takes the ids of its
// rank rows by shuffle; a corrupt id (see the header) is not read, and makes the segment's sums NaN.
template <typename T>
__global__ void __launch_bounds__(LORA_MAX_THREADS)
    lora_sgmv_expand_mma(const float* __restrict__ y, long long y_stride,
                         const typename T::storage* __restrict__ b_view, long long b_num_rows,
                         const int* __restrict__ b_rows, long long rows_stride,
                         const int* __restrict__ segment_indptr, const int* __restrict__ segment_adapters,
                         long long num_segments, const int* __restrict__ lora_ranks, long long num_adapters,
                         typename T::storage* __restrict__ out, long long out_stride, long long out_offset,
                         long long num_tokens, long long h_out, long long max_lora_rank) {
  typedef Vec<typename T::storage, 8> V;  // 16 bytes: 8 columns
  constexpr int BM = 16;
  __shared__ SegmentRows s_seg[BM];
  __shared__ int s_count;

  const int lane = threadIdx.x, warp = threadIdx.y;
  const int g = lane >> 2, t = lane & 3;
  const long long row0 = static_cast<long long>(blockIdx.x) * BM;
  const long long row_end = row0 + BM < num_tokens ? row0 + BM : num_tokens;
  const long long base = (static_cast<long long>(blockIdx.y) * blockDim.y + warp) * LORA_MMA_COLS;
  const long long ocol = base + 16 * t;  // this lane's output columns [ocol, ocol + 16)
  const bool o_ok[2] = {ocol < h_out, ocol + 8 < h_out};
  const long long bcol = base + 8 * g;  // this lane's columns of B [bcol, bcol + 8)
  const bool b_ok = bcol < h_out;
  const V zero = zero_vec<V>();
  long long rows[2];
  V* o_ptr[2];
  V ov[2][2];  // [row g / g + 8][columns ocol / ocol + 8], loaded first
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rows[h] = row0 + 8 * h + g;
    const bool in_range = rows[h] < num_tokens;
    const long long first = (in_range ? rows[h] : 0) * out_stride + out_offset + (o_ok[0] ? ocol : 0);
    o_ptr[h] = reinterpret_cast<V*>(out + first);
#pragma unroll
    for (int c = 0; c < 2; ++c) ov[h][c] = in_range && o_ok[c] ? o_ptr[h][c] : zero;
  }
  const int count = tile_segments(row0, row_end, segment_indptr, segment_adapters, num_segments, lora_ranks,
                                  num_adapters, max_lora_rank, s_seg, BM, &s_count);
  if (base >= h_out) return;  // no block-wide barrier follows

  for (int e = 0; e < count; ++e) {
    const SegmentRows seg = s_seg[e];
    bool in_seg[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) in_seg[h] = rows[h] >= seg.begin && rows[h] < seg.end;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;
    }
    const typename T::storage* b_col = b_view + (b_ok ? bcol : 0);  // this lane's columns of view row 0
    bool corrupt = false;  // a rank row's id is not a row of b_view: every product of the segment is NaN
    for (int kb = 0; kb < seg.rank; kb += 32) {  // 32 rank rows' ids per warp load
      const int my_id =
          static_cast<int>(lora_row_id(b_rows, rows_stride, seg.adapter, kb + lane, kb + lane < seg.rank));
      corrupt |= __ballot_sync(0xffffffffu, kb + lane < seg.rank && !lora_row_ok(my_id, b_num_rows)) != 0u;
      const int k_stop = kb + 32 < seg.rank ? kb + 32 : seg.rank;
      for (int k0 = kb; k0 < k_stop; k0 += 16) {  // two k8 steps at a time, all loads first
        V bv[2][2];
        float yv[2][2][2];  // [k8 step][row g / g + 8][k slot t / t + 4]
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const int kk = k0 - kb + 8 * s + 2 * t + p;  // in [0, 32): the lane holding this rank row's id
            const int k = kb + kk;
            const long long id = __shfl_sync(0xffffffffu, my_id, kk);  // all lanes: uniform loops
            const bool k_ok = k < seg.rank;
            const bool id_ok = k_ok && lora_row_ok(id, b_num_rows);
            const V* b_row = reinterpret_cast<const V*>(b_col + (id_ok ? id : 0) * h_out);
            bv[s][p] = load_vec(b_row, id_ok && b_ok);
#pragma unroll
            for (int h = 0; h < 2; ++h) yv[s][h][p] = load_f32(y + rows[h] * y_stride + k, k_ok && in_seg[h]);
          }
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          if (k0 + 8 * s >= seg.rank) break;  // uniform over the warp
          // A fragment: a0 (row g, slot t), a1 (row g + 8, slot t), a2 (row g, slot t + 4), a3 (row g + 8, t + 4).
          const float a_f[4] = {yv[s][0][0], yv[s][1][0], yv[s][0][1], yv[s][1][1]};
          unsigned int a_hi[4], a_lo[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            a_hi[q] = tf32_bits(a_f[q]);
            a_lo[q] = tf32_bits(a_f[q] - __uint_as_float(a_hi[q]));
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const unsigned int b[2] = {__float_as_uint(T::to_float(bv[s][0].v[j])),
                                       __float_as_uint(T::to_float(bv[s][1].v[j]))};
            lora_mma_tf32_1688(acc[j], a_hi, b);
            lora_mma_tf32_1688(acc[j], a_lo, b);
          }
        }
      }
    }
    if (corrupt) {  // as if the row were read: NaN times y, in every column of the segment's rows
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = lora_nan();
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!in_seg[h]) continue;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (!o_ok[c]) continue;
        V o;
#pragma unroll
        for (int j = 0; j < 8; ++j) o.v[j] = T::from_float(T::to_float(ov[h][c].v[j]) + acc[j][2 * h + c]);
        o_ptr[h][c] = o;
      }
    }
  }
}
