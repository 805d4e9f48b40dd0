// lora_cpu.cpp: the LoRA site op over the paged adapter pool on the CPU, one call per site for all rows of
// a step (prompt and decode rows alike). Compiled on first use by torch.utils.cpp_extension.load with
// -O3 -march=<the build machine's own>; worker/kernels/cpu_native.py builds, caches and wraps it.
//
// Semantics (worker/kernels/reference.py, lora_site_ref, is the spec): for every part p of the site,
//   out[i, o_p : o_p + h_out_p] += (x[i] @ a_view[a_rows_p[g, :r]].T) @ b_view_p[b_rows_p[g, :r]]
// with g = row_adapter[i] (-1: no adapter, row skipped) and r = lora_ranks_p[g] (0: part skipped). The
// x@A intermediate y is float32; the delta is summed in float32 and added to out, rounded once.
//
// Layouts (row-major, innermost dimension contiguous, row strides in elements):
//   x            [T, h_in]          X (float / bfloat16 / half), row stride x.stride(0)
//   out          [T, h_total]       X, row stride out.stride(0)
//   a_view       [rows_a, h_in]     P (float / bfloat16 / half), contiguous: the pool as rows of h_in
//   b_views[p]   [rows_b_p, h_out_p] P, contiguous: the pool as rows of h_out_p (B^T, scale folded in)
//   a_rows[p], b_rows[p]  [G, R_max] int32 row ids, rows contiguous; entries past r are never read
//   lora_ranks[p] [G] int32;  row_adapter [T] int32 in [-1, G); G = num_adapters, the step's adapters
// Row id j of a view of width w starts at element j * w, formed in 64 bits. Every id that is read is
// checked on the host first (ValueError), so no row outside the view and no unused row is touched.
//
// Design: rows are grouped by adapter (a counting sort of row_adapter, any row order), so each adapter's
// A and B rows are streamed from memory once for all of its rows. Shrink: register blocks of RB x rows
// times JB A rows (the A rows of all parts concatenated), dot products over h_in in float32 vectors.
// Expand: register blocks of RB rows times NV vectors of columns, each B row loaded once per block and
// broadcast-multiplied by y. 16-bit pool rows are widened in registers (bf16 by a shift, fp16 by F16C;
// a bf16 shrink on avx512_bf16 takes vdpbf16ps instead): no float32 copies of adapters. Work items
// are (adapter, row chunk, A-row chunk) for the shrink and (adapter, part, row chunk, column chunk) for
// the expand, spread by at::parallel_for. GCC vector extensions, so one source builds for AVX-512 (16
// lanes) and AVX2 (8 lanes) alike; intrinsics only under their ISA's macro; no AMX.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vectors.h"

namespace {

using namespace cpu_vectors;

#if defined(__AVX512F__)
constexpr int JB = 4;  // shrink: A rows per register block (RB * JB accumulators of 32 registers)
constexpr int NV = 4;  // expand: column vectors per register block
#else
constexpr int JB = 2;  // 16 registers: 4 x 2 accumulators, 4 x and one A vector
constexpr int NV = 2;
#endif
constexpr int RB = 4;             // x rows per register block
constexpr int64_t ROW_CHUNK = 16;  // rows per work item: its A / B chunk stays in L1/L2 across them
constexpr int64_t A_CHUNK = 16;    // A rows per shrink work item (a multiple of JB)
constexpr int64_t COL_CHUNK = 128;  // columns per expand work item (a multiple of NV * W)
constexpr int64_t SERIAL_FLOPS = 1 << 18;  // below this a call runs on the calling thread

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// y[r * ys + j] = x_r . a_j for R x rows and JB A rows (both h long); float32 accumulation. The next
// JB rows (ar[JB..2 JB), valid pointers) are prefetched on the way: the rows are short streams (a few
// KiB), too short for the hardware prefetcher to reach full bandwidth on its own.
template <int R, class X, class P>
void shrink_block(const X* const* xr, const P* const* ar, int64_t h, float* y, int64_t ys, int jn) {
  vf acc[R][JB] = {};
  int64_t k = 0;
  for (; k + W <= h; k += W) {
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load(xr[r] + k);
    for (int j = 0; j < JB; ++j) {
      __builtin_prefetch(ar[JB + j] + k);
      vf av = load(ar[j] + k);
      for (int r = 0; r < R; ++r) acc[r][j] += xv[r] * av;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < jn; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t t = k; t < h; ++t) s += to_float(xr[r][t]) * to_float(ar[j][t]);
      y[r * ys + j] = s;
    }
  }
}

#if defined(__AVX512BF16__)
// The same for a bf16 model over a bf16 pool on CPUs with avx512_bf16 (Xeon since Cooper Lake, Zen 4):
// vdpbf16ps multiplies pairs of bf16 exactly and adds them into float32 lanes, 32 elements of x and A
// per instruction and no widening. (Inputs below 2^-126 count as zero, far below LoRA's values.)
template <int R>
void shrink_block(const c10::BFloat16* const* xr, const c10::BFloat16* const* ar, int64_t h, float* y, int64_t ys,
                  int jn) {
  __m512 acc[R][JB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < JB; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= h; k += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(xr[r] + k);
    for (int j = 0; j < JB; ++j) {
      __builtin_prefetch(ar[JB + j] + k);
      __m512bh av = (__m512bh)_mm512_loadu_si512(ar[j] + k);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], av);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < jn; ++j) {
      float s = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t t = k; t < h; ++t) s += to_float(xr[r][t]) * to_float(ar[j][t]);
      y[r * ys + j] = s;
    }
  }
}
#endif

// out_r[c : c + N * W] += sum_j y_r[j] * b_j[c : ...] for R rows, then rounded once into X.
template <int R, int N, class X, class P>
void expand_block(const float* y, int64_t ys, const P* const* br, int rank, X* const* orow, int64_t c) {
  vf acc[R][N] = {};
  for (int j = 0; j < rank; ++j) {
    vf bv[N];
    for (int n = 0; n < N; ++n) bv[n] = load(br[j] + c + n * W);
    for (int r = 0; r < R; ++r) {
      vf yv = broadcast(y[r * ys + j]);
      for (int n = 0; n < N; ++n) acc[r][n] += yv * bv[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) {
      X* o = orow[r] + c + n * W;
      store(o, load(o) + acc[r][n]);
    }
}

// The columns [c, end) past the last full vector, one at a time.
template <class X, class P>
void expand_tail(const float* y, int64_t ys, const P* const* br, int rank, X* const* orow, int rows,
                 int64_t c, int64_t end) {
  for (; c < end; ++c)
    for (int r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int j = 0; j < rank; ++j) s += y[r * ys + j] * to_float(br[j][c]);
      orow[r][c] = from_float<X>(to_float(orow[r][c]) + s);
    }
}

struct Task {
  int64_t g, p, row_lo, row_hi, lo, hi;  // rows of g's list; shrink: lo/hi are A rows, expand: columns of p
};

// One call's plan in flat arrays, kept per thread and reused: once warm, a call allocates nothing.
struct Plan {
  std::vector<int64_t> order;      // [T] the batch rows grouped by adapter (a counting sort)
  std::vector<int64_t> row_start;  // [G + 1] adapter g's rows are order[row_start[g] : row_start[g + 1]]
  std::vector<int64_t> part_rank;  // [G * P] adapter g's rank in part p (0 for an adapter without rows)
  std::vector<int64_t> part_col;   // [G * P] first column of part p's rank rows in g's y rows
  std::vector<int64_t> rank;       // [G] sum over the parts: the width of g's y rows
  std::vector<int64_t> y_base;     // [G] g's y rows start at y[y_base[g]], [rows of g, rank[g]]
  std::vector<int64_t> a_start;    // [G] g's A rows (every part's, concatenated, padded): a_off[a_start[g]:]
  std::vector<int64_t> b_start;    // [G * P] g's B rows in part p: b_off[b_start[g * P + p]:]
  std::vector<int64_t> a_off, b_off;  // element offsets of rows in a_view / b_views[p] (64-bit)
  std::vector<Task> shrink, expand;
  int64_t y_size = 0, flops = 0;
};

void check_table(const at::Tensor& t, const char* name, int64_t p, int64_t num_adapters) {
  TORCH_CHECK_VALUE(t.dtype() == at::kInt && t.dim() == 2 && t.size(0) == num_adapters && t.stride(1) == 1,
                    "parts[", p, "].", name, ": need [G = ", num_adapters, ", R_max] int32 with contiguous rows, got ",
                    t.sizes(), " ", t.dtype());
}

// Validates every argument (ValueError naming it) and every row id that will be read, then plans the call.
void make_plan(Plan& pl, const at::Tensor& x, const at::Tensor& a_view, const std::vector<at::Tensor>& b_views,
               const std::vector<at::Tensor>& a_rows, const std::vector<at::Tensor>& b_rows,
               const std::vector<at::Tensor>& ranks, const std::vector<int64_t>& offsets,
               const at::Tensor& row_adapter, int64_t num_adapters, const at::Tensor& out) {
  const int64_t num_parts = b_views.size(), n = x.size(0), G = num_adapters, h_in = x.size(1);
  TORCH_CHECK_VALUE(a_rows.size() == (size_t)num_parts && b_rows.size() == (size_t)num_parts &&
                        ranks.size() == (size_t)num_parts && offsets.size() == (size_t)num_parts,
                    "parts: b_views, a_rows, b_rows, lora_ranks and offsets differ in length");
  const int32_t* ra = row_adapter.data_ptr<int32_t>();
  pl.row_start.assign(G + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(ra[i] >= -1 && ra[i] < G, "rows: adapter indices: row ", i, " has g = ", ra[i],
                      ", outside [-1, ", G, ")");
    if (ra[i] >= 0) ++pl.row_start[ra[i] + 1];
  }
  for (int64_t g = 0; g < G; ++g) pl.row_start[g + 1] += pl.row_start[g];
  pl.order.resize(pl.row_start[G]);
  pl.y_base.assign(pl.row_start.begin(), pl.row_start.end() - 1);  // a cursor per adapter, for now
  for (int64_t i = 0; i < n; ++i)
    if (ra[i] >= 0) pl.order[pl.y_base[ra[i]]++] = i;

  pl.part_rank.assign(G * num_parts, 0);
  pl.part_col.assign(G * num_parts, 0);
  pl.rank.assign(G, 0);
  std::pair<int64_t, int64_t> spans[8];
  TORCH_CHECK_VALUE(num_parts <= 8, "parts: at most 8 per site, got ", num_parts);
  for (int64_t p = 0; p < num_parts; ++p) {
    const at::Tensor& b = b_views[p];
    TORCH_CHECK_VALUE(b.dtype() == a_view.dtype() && b.dim() == 2 && b.is_contiguous(), "parts[", p,
                      "].b_view: need [rows, h_out] contiguous ", a_view.dtype(), ", got ", b.sizes(), " ", b.dtype());
    check_table(a_rows[p], "a_rows", p, G);
    check_table(b_rows[p], "b_rows", p, G);
    TORCH_CHECK_VALUE(b_rows[p].size(1) == a_rows[p].size(1), "parts[", p, "]: a_rows ", a_rows[p].sizes(),
                      " and b_rows ", b_rows[p].sizes(), " differ");
    const at::Tensor& r = ranks[p];
    TORCH_CHECK_VALUE(r.dtype() == at::kInt && r.dim() == 1 && r.size(0) == G && r.is_contiguous(), "parts[", p,
                      "].lora_ranks: need [G = ", G, "] int32, got ", r.sizes());
    spans[p] = {offsets[p], offsets[p] + b.size(1)};
    const int64_t r_max = a_rows[p].size(1);
    const int32_t* rk = r.data_ptr<int32_t>();
    for (int64_t g = 0; g < G; ++g) {
      if (pl.row_start[g + 1] == pl.row_start[g]) continue;  // no rows: its tables are never read
      TORCH_CHECK_VALUE(rk[g] >= 0 && rk[g] <= r_max, "parts[", p, "].lora_ranks: adapter ", g, " has rank ", rk[g],
                        ", outside [0, R_max = ", r_max, "]");
      pl.part_rank[g * num_parts + p] = rk[g];
      pl.part_col[g * num_parts + p] = pl.rank[g];
      pl.rank[g] += rk[g];
    }
  }
  std::sort(spans, spans + num_parts);
  for (int64_t i = 0; i < num_parts; ++i) {
    TORCH_CHECK_VALUE(spans[i].first >= 0 && (i == 0 || spans[i].first >= spans[i - 1].second),
                      "parts: output columns overlap or start below 0");
    TORCH_CHECK_VALUE(spans[i].second <= out.size(1), "out: ", out.size(1), " columns, parts write up to column ",
                      spans[i].second);
  }

  pl.a_start.assign(G, 0);
  pl.b_start.assign(G * num_parts, 0);
  pl.a_off.clear();
  pl.b_off.clear();
  pl.shrink.clear();
  pl.expand.clear();
  pl.y_size = pl.flops = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = pl.row_start[g + 1] - pl.row_start[g];
    pl.y_base[g] = pl.y_size;
    if (rows == 0 || pl.rank[g] == 0) continue;
    pl.y_size += rows * pl.rank[g];
    pl.a_start[g] = pl.a_off.size();
    for (int64_t p = 0; p < num_parts; ++p) {
      const int64_t rank = pl.part_rank[g * num_parts + p], h_out = b_views[p].size(1);
      const int32_t* ar = a_rows[p].data_ptr<int32_t>() + g * a_rows[p].stride(0);
      const int32_t* br = b_rows[p].data_ptr<int32_t>() + g * b_rows[p].stride(0);
      pl.b_start[g * num_parts + p] = pl.b_off.size();
      for (int64_t j = 0; j < rank; ++j) {
        TORCH_CHECK_VALUE(ar[j] >= 0 && ar[j] < a_view.size(0) && br[j] >= 0 && br[j] < b_views[p].size(0), "parts[",
                          p, "]: adapter ", g, " rank row ", j, " has row ids (", ar[j], ", ", br[j],
                          "), outside the views' ", a_view.size(0), " and ", b_views[p].size(0), " rows");
        pl.a_off.push_back(static_cast<int64_t>(ar[j]) * h_in);
        pl.b_off.push_back(static_cast<int64_t>(br[j]) * h_out);
      }
      pl.flops += rows * rank * (h_in + h_out);
    }
    // Padding to whole blocks (computed, not stored), and one block more for shrink_block's prefetch.
    while ((pl.a_off.size() - pl.a_start[g]) % JB) pl.a_off.push_back(pl.a_off.back());
    for (int j = 0; j < JB; ++j) pl.a_off.push_back(pl.a_off.back());
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_CHUNK) {
      const int64_t r1 = std::min(rows, r0 + ROW_CHUNK);
      for (int64_t j0 = 0; j0 < pl.rank[g]; j0 += A_CHUNK)
        pl.shrink.push_back({g, 0, r0, r1, j0, std::min(pl.rank[g], j0 + A_CHUNK)});
      for (int64_t p = 0; p < num_parts; ++p) {
        if (pl.part_rank[g * num_parts + p] == 0) continue;
        const int64_t h_out = b_views[p].size(1);
        for (int64_t c0 = 0; c0 < h_out; c0 += COL_CHUNK)
          pl.expand.push_back({g, p, r0, r1, c0, std::min(h_out, c0 + COL_CHUNK)});
      }
    }
  }
}

template <class X, class P>
void run(const Plan& pl, const at::Tensor& x, const at::Tensor& a_view, const std::vector<at::Tensor>& b_views,
         const std::vector<int64_t>& offsets, at::Tensor& out) {
  const int64_t h_in = x.size(1), num_parts = b_views.size();
  const X* xp = x.data_ptr<X>();
  X* op = out.data_ptr<X>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  // Row pointers (per template instance and thread, reused): A rows then each part's B rows.
  // Plain references: inside the parallel lambdas a thread_local name would mean the worker's own copy.
  thread_local std::vector<const P*> a_tls, b_tls;
  thread_local std::vector<float> y_tls;
  std::vector<const P*>&a_ptr = a_tls, &b_ptr = b_tls;
  std::vector<float>& y_buf = y_tls;
  const P* av = a_view.data_ptr<P>();
  a_ptr.resize(pl.a_off.size());
  for (size_t i = 0; i < pl.a_off.size(); ++i) a_ptr[i] = av + pl.a_off[i];
  b_ptr.resize(pl.b_off.size());
  for (int64_t g = 0, G = pl.rank.size(); g < G; ++g)
    for (int64_t p = 0; p < num_parts; ++p) {
      const P* bv = b_views[p].data_ptr<P>();
      const int64_t s = pl.b_start[g * num_parts + p];
      for (int64_t j = 0; j < pl.part_rank[g * num_parts + p] && pl.rank[g]; ++j) b_ptr[s + j] = bv + pl.b_off[s + j];
    }
  if ((int64_t)y_buf.size() < pl.y_size) y_buf.resize(pl.y_size);
  float* y = y_buf.data();  // the x@A intermediate, float32 (see Plan.y_base)
  const int64_t serial = pl.flops < SERIAL_FLOPS ? 1 << 30 : 1;  // grain: no fork for a small call

  at::parallel_for(0, pl.shrink.size(), serial, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const Task& task = pl.shrink[t];
      const int64_t* rows = pl.order.data() + pl.row_start[task.g];
      const int64_t rank = pl.rank[task.g];
      for (int64_t r0 = task.row_lo; r0 < task.row_hi; r0 += RB) {
        const int rn = std::min<int64_t>(RB, task.row_hi - r0);
        const X* xr[RB];
        for (int r = 0; r < rn; ++r) xr[r] = xp + rows[r0 + r] * xs;
        float* yr = y + pl.y_base[task.g] + r0 * rank;
        for (int64_t j = task.lo; j < task.hi; j += JB) {
          const P* const* ar = a_ptr.data() + pl.a_start[task.g] + j;
          const int jn = std::min<int64_t>(JB, task.hi - j);
          switch (rn) {
            case 1: shrink_block<1>(xr, ar, h_in, yr + j, rank, jn); break;
            case 2: shrink_block<2>(xr, ar, h_in, yr + j, rank, jn); break;
            case 3: shrink_block<3>(xr, ar, h_in, yr + j, rank, jn); break;
            default: shrink_block<4>(xr, ar, h_in, yr + j, rank, jn);
          }
        }
      }
    }
  });

  at::parallel_for(0, pl.expand.size(), serial, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const Task& task = pl.expand[t];
      const int64_t gp = task.g * num_parts + task.p, ys = pl.rank[task.g];
      const int64_t* rows = pl.order.data() + pl.row_start[task.g];
      const int rank = pl.part_rank[gp];
      const P* const* br = b_ptr.data() + pl.b_start[gp];
      for (int64_t r0 = task.row_lo; r0 < task.row_hi; r0 += RB) {
        const int rn = std::min<int64_t>(RB, task.row_hi - r0);
        X* orow[RB];
        for (int r = 0; r < rn; ++r) orow[r] = op + rows[r0 + r] * os + offsets[task.p];
        const float* yr = y + pl.y_base[task.g] + r0 * ys + pl.part_col[gp];
        int64_t c = task.lo;
        for (; c + NV * W <= task.hi; c += NV * W) switch (rn) {
            case 1: expand_block<1, NV>(yr, ys, br, rank, orow, c); break;
            case 2: expand_block<2, NV>(yr, ys, br, rank, orow, c); break;
            case 3: expand_block<3, NV>(yr, ys, br, rank, orow, c); break;
            default: expand_block<4, NV>(yr, ys, br, rank, orow, c);
          }
        for (; c + W <= task.hi; c += W) switch (rn) {
            case 1: expand_block<1, 1>(yr, ys, br, rank, orow, c); break;
            case 2: expand_block<2, 1>(yr, ys, br, rank, orow, c); break;
            case 3: expand_block<3, 1>(yr, ys, br, rank, orow, c); break;
            default: expand_block<4, 1>(yr, ys, br, rank, orow, c);
          }
        expand_tail(yr, ys, br, rank, orow, rn, c, task.hi);
      }
    }
  });
}

template <class X>
void dispatch_pool(const Plan& pl, const at::Tensor& x, const at::Tensor& a_view,
                   const std::vector<at::Tensor>& b_views, const std::vector<int64_t>& offsets, at::Tensor& out) {
  switch (a_view.scalar_type()) {
    case at::kFloat: return run<X, float>(pl, x, a_view, b_views, offsets, out);
    case at::kBFloat16: return run<X, c10::BFloat16>(pl, x, a_view, b_views, offsets, out);
    case at::kHalf: return run<X, c10::Half>(pl, x, a_view, b_views, offsets, out);
    default: TORCH_CHECK_VALUE(false, "a_view: the pool dtype must be float32, bfloat16 or float16, got ",
                               a_view.dtype());
  }
}

}  // namespace

// out += the LoRA delta of every part (see the header); parts are given as parallel lists.
void lora_site(const at::Tensor& x, const at::Tensor& a_view, const std::vector<at::Tensor>& b_views,
               const std::vector<at::Tensor>& a_rows, const std::vector<at::Tensor>& b_rows,
               const std::vector<at::Tensor>& lora_ranks, const std::vector<int64_t>& offsets,
               const at::Tensor& row_adapter, int64_t num_adapters, at::Tensor out) {
  TORCH_CHECK_VALUE(row_adapter.dtype() == at::kInt && row_adapter.dim() == 1 && row_adapter.is_contiguous(),
                    "rows.row_adapter: need [T] int32, got ", row_adapter.sizes(), " ", row_adapter.dtype());
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.size(0) == row_adapter.size(0) &&
                        (xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf),
                    "x: need [T = ", row_adapter.size(0), ", h_in] float32, bfloat16 or float16 on the CPU with ",
                    "contiguous rows, got ", x.sizes(), " ", x.dtype(), " ", x.device());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.stride(1) == 1 && out.dtype() == x.dtype() && out.size(0) == x.size(0),
                    "out: need [T = ", x.size(0), ", h_out] ", x.dtype(), " with contiguous rows, got ", out.sizes(),
                    " ", out.dtype());
  TORCH_CHECK_VALUE(a_view.dim() == 2 && a_view.is_contiguous() && a_view.size(1) == x.size(1), "a_view: need [rows, ",
                    x.size(1), "] contiguous, got ", a_view.sizes());
  thread_local Plan pl;
  make_plan(pl, x, a_view, b_views, a_rows, b_rows, lora_ranks, offsets, row_adapter, num_adapters, out);
  switch (xt) {
    case at::kFloat: return dispatch_pool<float>(pl, x, a_view, b_views, offsets, out);
    case at::kBFloat16: return dispatch_pool<c10::BFloat16>(pl, x, a_view, b_views, offsets, out);
    case at::kHalf: return dispatch_pool<c10::Half>(pl, x, a_view, b_views, offsets, out);
    default: TORCH_CHECK(false, "unreachable: x's dtype was checked");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own ops run: the server's other Python threads go on meanwhile.
  m.def("lora_site", &lora_site, "out += the LoRA delta of a site's parts over the adapter pool (lora_cpu.cpp)",
        py::call_guard<py::gil_scoped_release>());
}
