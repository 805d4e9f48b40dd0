// lora_gather_matmul.cu: punica-style LoRA gather matmuls, BGMV (one slot per row; decode) and SGMV
// (contiguous segments of rows sharing a slot; prefill). Compiled at run time by NVRTC through
// cupy.RawModule (worker/kernels/cuda.py); the templates are instantiated there by name expression.
//
// Semantics (worker/kernels/reference.py is the spec; these kernels must equal its *_ref functions):
//   lora_shrink: y[i, :r]            = x[i] @ lora_a_stack[s, :r].T   (fp32 accumulation, fp32 y)
//   lora_expand: out[i, o:o + h_out] += y[i, :r] @ lora_b_stack[s, :r] (fp32 sum, rounded once to T)
// where s is the slot of row i and r = lora_ranks[s]:
//   bgmv (slot_ids != nullptr):       s = slot_ids[i]
//   sgmv (segment_indptr != nullptr): s = segment_slot_ids[g] for the g with
//                                     segment_indptr[g] <= i < segment_indptr[g + 1]
// A row is skipped entirely (no loads, y / out untouched) when r == 0 ("no adapter"), when s is outside
// [0, num_slots), or (sgmv) when i >= segment_indptr[num_segments]. r is clamped to [0, max_rank].
// Only rank rows k < r of a slot are read, so mixed ranks share one launch at their own cost.
//
// Layouts (row-major; the innermost dimension is contiguous, row strides are in elements):
//   x               [num_tokens, h_in]            T, row stride x_stride
//   lora_a_stack    [num_slots, max_rank, h_in]   T, contiguous
//   lora_b_stack    [num_slots, max_rank, h_out]  T, contiguous
//   lora_ranks      [num_slots]                   int32
//   slot_ids        [num_tokens]                  int32 (bgmv; nullptr for sgmv)
//   segment_indptr  [num_segments + 1]            int32 (sgmv; nullptr for bgmv), non-decreasing, [0] == 0
//   segment_slot_ids [num_segments]               int32 (sgmv)
//   y               [num_tokens, max_rank]        float32, row stride y_stride
//   out             [num_tokens, h_total]         T, row stride out_stride; columns [out_offset, +h_out)
// T is Bf16, Fp16 or Fp32: a storage type (uint16 bits or float) plus conversions. No CUDA header is
// included (conversions are bit operations and PTX cvt), so NVRTC needs no include path.
// VEC is the number of elements per load/store: 16 bytes (8 for 16-bit types, 4 for fp32) or 1. VEC > 1
// requires every pointer, row stride, h and out_offset to be a multiple of VEC elements (the wrapper
// checks this and otherwise launches VEC == 1).
//
// Launch shape (a function of tensor shapes only, never of data, so CUDA graphs can capture it):
//   lora_shrink<T, VEC, TOK>: grid (ceil(num_tokens / TOK), rank_tile_blocks),
//     block (threads_per_row in {32, 64, 128, 256}, rank_rows), at most 256 threads.
//     A block handles TOK rows of x and loops over tiles of rank_rows rank rows (tile blockIdx.y, then
//     every gridDim.y-th, up to the rows' largest rank); the blockDim.x threads of one rank row split
//     h_in, then reduce (warp shuffles, then shared memory across the row's warps). gridDim.y is
//     ceil(max_rank / rank_rows) for few tokens, fewer when there are enough blocks to fill the GPU.
//   lora_expand<T, VEC, TOK>: grid (ceil(num_tokens / TOK), ceil(h_out / (VEC * blockDim.x))),
//     block (column threads in {32, 64}, rank_splits), at most 256 threads. A thread owns VEC columns of
//     TOK rows and loops over its share of the rank (threadIdx.y takes rank rows
//     [ty * ceil(r / rank_splits), ...)), reading B rows [r, h_out] contiguously across the block; the
//     shares are summed in shared memory and threadIdx.y == 0 adds the sum to out (loaded up front).
//   TOK > 1 (sgmv) fuses the block's TOK rows when they share a slot, so each A / B vector is loaded once
//   for TOK rows; a block whose rows differ in slot or rank computes them one row at a time.
//   A block returns at once when none of its rows needs any of its rank rows (rank 0 costs one lookup).

#define LORA_MAX_THREADS 256  // blockDim.x * blockDim.y <= 256
#define LORA_MAX_WARPS (LORA_MAX_THREADS / 32)

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
};

struct Fp16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float to_float(storage h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static __device__ __forceinline__ storage from_float(float f) {
    storage h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
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

// Slot and rank of row i (slot -1 / rank 0 when the row is skipped).
__device__ __forceinline__ void resolve_row(long long i, long long num_tokens, const int* slot_ids,
                                            const int* segment_indptr, const int* segment_slot_ids,
                                            long long num_segments, const int* lora_ranks,
                                            long long num_slots, long long max_rank, int* slot_out,
                                            int* rank_out) {
  int slot = -1;
  int rank = 0;
  if (i < num_tokens) {
    long long s = -1;
    if (segment_indptr != nullptr) {
      // First g with segment_indptr[g + 1] > i; then segment_indptr[g] <= i (empty segments skipped).
      long long lo = 0, hi = num_segments;
      while (lo < hi) {
        const long long mid = (lo + hi) >> 1;
        if (segment_indptr[mid + 1] <= i) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      if (lo < num_segments) s = segment_slot_ids[lo];
    } else {
      s = slot_ids[i];
    }
    if (s >= 0 && s < num_slots) {
      const long long r = lora_ranks[s];
      slot = static_cast<int>(s);
      rank = static_cast<int>(r < 0 ? 0 : (r > max_rank ? max_rank : r));
    }
  }
  *slot_out = slot;
  *rank_out = rank;
}

// Resolves the block's TOK rows into shared memory; returns the largest rank among them and whether
// all TOK rows share one slot with a nonzero rank (then they can be fused).
template <int TOK>
__device__ __forceinline__ int resolve_block_rows(long long row0, long long num_tokens, const int* slot_ids,
                                                  const int* segment_indptr, const int* segment_slot_ids,
                                                  long long num_segments, const int* lora_ranks,
                                                  long long num_slots, long long max_rank, int* s_slot,
                                                  int* s_rank, bool* same_slot) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (tid < TOK) {
    resolve_row(row0 + tid, num_tokens, slot_ids, segment_indptr, segment_slot_ids, num_segments,
                lora_ranks, num_slots, max_rank, &s_slot[tid], &s_rank[tid]);
  }
  __syncthreads();
  int group_rank = 0;
  bool same = s_rank[0] > 0;
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    group_rank = s_rank[t] > group_rank ? s_rank[t] : group_rank;
    same = same && s_slot[t] == s_slot[0] && s_rank[t] == s_rank[0];
  }
  *same_slot = same;
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

template <typename T, int VEC, int TOK>
__global__ void lora_shrink(const typename T::storage* __restrict__ x, long long x_stride,
                            const typename T::storage* __restrict__ lora_a_stack,
                            const int* __restrict__ slot_ids, const int* __restrict__ segment_indptr,
                            const int* __restrict__ segment_slot_ids, long long num_segments,
                            const int* __restrict__ lora_ranks, long long num_slots, float* __restrict__ y,
                            long long y_stride, long long num_tokens, long long h_in, long long max_rank) {
  typedef typename T::storage S;
  __shared__ int s_slot[TOK];
  __shared__ int s_rank[TOK];
  __shared__ float s_partial[LORA_MAX_WARPS][TOK];

  const long long row0 = static_cast<long long>(blockIdx.x) * TOK;
  bool same_slot;
  const int group_rank =
      resolve_block_rows<TOK>(row0, num_tokens, slot_ids, segment_indptr, segment_slot_ids, num_segments,
                              lora_ranks, num_slots, max_rank, s_slot, s_rank, &same_slot);
  const long long n_vec = h_in / VEC;
  // Rank tiles blockIdx.y, blockIdx.y + gridDim.y, ... up to the largest rank among the block's rows
  // (uniform over the block); later tiles re-read the block's rows of x from L1.
  for (int k0 = blockIdx.y * blockDim.y; k0 < group_rank; k0 += gridDim.y * blockDim.y) {
    const int k = k0 + threadIdx.y;
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = 0.0f;
    if (TOK > 1 && same_slot) {
      if (k < s_rank[0]) {
        const S* x_rows[TOK];
#pragma unroll
        for (int t = 0; t < TOK; ++t) x_rows[t] = x + (row0 + t) * x_stride;
        shrink_dot<T, VEC, TOK>(lora_a_stack + (s_slot[0] * max_rank + k) * h_in, x_rows, n_vec, acc);
      }
    } else {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        if (k < s_rank[t]) {
          const S* x_row = x + (row0 + t) * x_stride;
          shrink_dot<T, VEC, 1>(lora_a_stack + (s_slot[t] * max_rank + k) * h_in, &x_row, n_vec, &acc[t]);
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

// acc[t][j] += sum_k y_rows[t][k] * b[k * b_row_stride].v[j] for k in [k_begin, k_end), for VEC columns
// of NT rows (b points at the slot's rank row 0, at this thread's column vector).
template <typename T, int VEC, int NT>
__device__ __forceinline__ void expand_accumulate(const Vec<typename T::storage, VEC>* b, long long b_row_stride,
                                                  int k_begin, int k_end, const float* const* y_rows,
                                                  float (*acc)[VEC]) {
  typedef Vec<typename T::storage, VEC> V;
  constexpr int U = NT == 1 ? 8 : 4;  // rank rows of B in flight per thread
  int k = k_begin;
  for (; k + U <= k_end; k += U) {
    V bv[U];
    float yv[NT][U];
#pragma unroll
    for (int u = 0; u < U; ++u) bv[u] = b[(k + u) * b_row_stride];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int u = 0; u < U; ++u) yv[t][u] = y_rows[t][k + u];
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
  for (; k < k_end; ++k) {
    const V bv = b[k * b_row_stride];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float yk = y_rows[t][k];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[t][j] = fmaf(yk, T::to_float(bv.v[j]), acc[t][j]);
    }
  }
}

template <typename T, int VEC, int TOK>
__global__ void lora_expand(const float* __restrict__ y, long long y_stride,
                            const typename T::storage* __restrict__ lora_b_stack,
                            const int* __restrict__ slot_ids, const int* __restrict__ segment_indptr,
                            const int* __restrict__ segment_slot_ids, long long num_segments,
                            const int* __restrict__ lora_ranks, long long num_slots,
                            typename T::storage* __restrict__ out, long long out_stride, long long out_offset,
                            long long num_tokens, long long h_out, long long max_rank) {
  typedef Vec<typename T::storage, VEC> V;
  __shared__ int s_slot[TOK];
  __shared__ int s_rank[TOK];
  __shared__ float s_partial[LORA_MAX_THREADS * TOK * VEC];

  const long long row0 = static_cast<long long>(blockIdx.x) * TOK;
  bool same_slot;
  const int group_rank =
      resolve_block_rows<TOK>(row0, num_tokens, slot_ids, segment_indptr, segment_slot_ids, num_segments,
                              lora_ranks, num_slots, max_rank, s_slot, s_rank, &same_slot);
  if (group_rank == 0) return;  // uniform over the block: no row has an adapter
  const long long n_vec = h_out / VEC;
  const long long v = static_cast<long long>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool column_ok = v < n_vec;  // threads past h_out still take part in the reduction's barrier
  const bool writer = column_ok && threadIdx.y == 0;
  const V* b_stack = reinterpret_cast<const V*>(lora_b_stack);

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
    if (TOK > 1 && same_slot) {
      const int r = s_rank[0];
      const int chunk = (r + blockDim.y - 1) / blockDim.y;  // rank rows per threadIdx.y
      const int k_begin = threadIdx.y * chunk;
      const int k_end = k_begin + chunk < r ? k_begin + chunk : r;
      const float* y_rows[TOK];
#pragma unroll
      for (int t = 0; t < TOK; ++t) y_rows[t] = y + (row0 + t) * y_stride;
      expand_accumulate<T, VEC, TOK>(b_stack + s_slot[0] * max_rank * n_vec + v, n_vec, k_begin, k_end, y_rows,
                                     acc);
    } else {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        const int r = s_rank[t];
        const int chunk = (r + blockDim.y - 1) / blockDim.y;
        const int k_begin = threadIdx.y * chunk;
        const int k_end = k_begin + chunk < r ? k_begin + chunk : r;
        const float* y_row = y + (row0 + t) * y_stride;
        expand_accumulate<T, VEC, 1>(b_stack + s_slot[t] * max_rank * n_vec + v, n_vec, k_begin, k_end, &y_row,
                                     &acc[t]);
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
