// attention_cpu.cpp: paged attention over the KV cache on the CPU, one call per layer for all rows of a
// step (decode rows, whole prompts and continuing prefill chunks alike), reading the K/V blocks in place
// through the block table. Compiled on first use by torch.utils.cpp_extension.load with -O3
// -march=<the build machine's own>; worker/kernels/cpu_native.py builds and caches it,
// worker/kernels/cpu_attention.py wraps it.
//
// Semantics (worker/kernels/reference.py, paged_attention_ref, is the spec): sequence s owns the query
// rows [query_starts[s], query_starts[s + 1]) of q, n_s of them; row i is at position
// p = context_lens[s] - n_s + i and attends to the keys k with k <= p and (window == 0 or k > p - window):
//   out[row, h] = softmax_k(scale * q[row, h] . K[k, h / G]) @ V[k, h / G],   G = H / H_kv (GQA)
// with K[k] = key_cache[block_tables[s, k / block_size], k % block_size] (V alike). Float32 softmax and
// accumulation, out rounded once into q's dtype. This step's K/V are already in the cache.
//
// Layouts (row-major, innermost dimension contiguous, strides in elements):
//   q            [T, H, D]                       X (float / bfloat16 / half), any row and head stride
//   out          [T, H, D]                       X, any row and head stride (allocated when not given)
//   key_cache, value_cache [num_blocks, block_size, H_kv, D]  X, contiguous
//   block_tables [S, max_blocks] int32, rows contiguous; entries past the keys a sequence reads unread
//   query_starts [S + 1] int32, context_lens [S] int32
// D is a multiple of 8. Every block id that is read is checked on the host first (ValueError), and no
// key at or past context_lens[s] (nor below every row's window) is ever touched.
//
// Design: work items are (sequence, key share) for a decode row and (sequence, kv head, NT query tiles)
// for prompt rows; the G query heads of a kv head are always in one item, so each K/V row is read once
// for all of them.
// - Decode rows (n_s = 1, memory bound): one pass over the row's keys in blocks of KD, every kv head at
//   once (a key's K/V rows of all heads are contiguous in the cache, so the row streams whole; the next
//   block's rows are prefetched, as blocks are scattered); q . k as vector dot products over D (lanes
//   over D) and a horizontal sum, then an online softmax (running max and sum) and P.V into H float32
//   accumulator rows. A long context with few items is split over the keys (split-K) so every thread
//   works at batch 1; the shares' (max, sum, accumulator) are merged after.
// - Prompt and chunk rows (n_s > 1, compute bound): a tile of R rows x G heads (R * G <= W query
//   vectors) is transposed once into QT [D][W] so lanes run over the tile's queries; per block of KT = W
//   keys, QK^T is KT accumulators updated with a broadcast of each key element (K rows widened into a
//   small float32 buffer), the online softmax is vertical across lanes (no horizontal reductions), and
//   P.V updates OT [D][W] with broadcast V elements. An item holds NT such tiles of consecutive rows and
//   widens each key block once for all of them (a long prefix streams from L3 once per NT tiles, not
//   per tile). Only key blocks on the causal diagonal or the window's edge are masked; blocks past a
//   tile's rows or below its window are skipped, and those below every row's window never read.
// 16-bit caches are widened in registers (bf16 by a shift, fp16 by F16C); a bf16 tile's QK^T takes
// vdpbf16ps on avx512_bf16 instead (exact products, float32 sums). Items are handed out
// largest first from an atomic counter inside at::parallel_for (costs differ a lot under a causal mask).
// GCC vector extensions, so one source builds for AVX-512 (16 lanes) and AVX2 (8 lanes) alike;
// intrinsics only under their ISA's macro; no AMX.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_vectors.h"

namespace {

using namespace cpu_vectors;

#if defined(__AVX512F__)
constexpr int DB = 8;  // tile P.V: rows of OT per register block (KT P vectors + DB accumulators)
#else
constexpr int DB = 4;
#endif
constexpr int KT = W;                      // tile: keys per softmax block (one QK^T accumulator each)
constexpr int NT = 4;  // tiles per prompt item: a block of keys is widened once for all, hot in L1
constexpr int KD = 16;  // decode: keys per softmax block (a multiple of W): its widened K/V stay in L1
static_assert(KD % W == 0, "qk_decode sums W keys at a time");
constexpr int AHEAD = 64;  // decode: keys prefetched ahead (into L2: L1's few fill buffers would stall)
constexpr int64_t MIN_SPLIT_KEYS = 256;    // decode split-K: no share smaller than this
constexpr int64_t SERIAL_COST = 1 << 15;   // below this (about 10 us of work) a call runs unforked
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vi broadcast_i(int32_t s) { return vi{} + s; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(vf v) {  // lanes hold no NaN (scores of finite q and K; -inf past a block's keys)
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#elif defined(__AVX__)
  __m128 m = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
#else
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

// e^x in float32 lanes (relative error about 2e-7): 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2,
// e^r by its degree-6 Taylor polynomial. x below -87 (and -inf, a masked score) gives exactly 0.
inline vf vexp(vf x) {
  const vi under = x < broadcast(-87.f);
  x = x < broadcast(-87.f) ? broadcast(-87.f) : x;
  x = x > broadcast(88.f) ? broadcast(88.f) : x;
  const vf magic = broadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504f + magic) - magic;
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts: r stays exact
  vf p = broadcast(1.f / 720);
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf y = p * (vf)e;
  return (vf)((vi)y & ~under);
}

// Widen one row of D elements to float32 (D a multiple of 8; a tail of 8 on AVX-512 one by one).
template <class X>
inline void widen(const X* src, float* dst, int64_t D) {
  int64_t d = 0;
  for (; d + W <= D; d += W) store(dst + d, load(src + d));
  for (; d < D; ++d) dst[d] = to_float(src[d]);
}

struct Args {
  const void *q, *kc, *vc;
  void* out;
  int64_t q_s0, q_s1, o_s0, o_s1;  // row and head strides of q and out
  const int32_t *bt, *qs, *cl;
  int64_t bt_s0, S, H, Hkv, G, D, Dp, BS, row_stride;  // Dp: D rounded up to W; row_stride = H_kv * D
  float scale;
  int64_t window;
  bool direct;  // float32 caches with D % W == 0: decode reads the cache rows as they are
};

// Key positions of one sequence, in order, as flat cache rows (block * block_size + offset).
struct Cursor {
  const int32_t* table;
  int64_t bs, b, o;
  Cursor(const int32_t* t, int64_t block_size, int64_t k) : table(t), bs(block_size), b(k / bs), o(k % bs) {}
  int64_t next() {
    const int64_t r = static_cast<int64_t>(table[b]) * bs + o;
    if (++o == bs) o = 0, ++b;
    return r;
  }
};

struct Item {
  int64_t cost;
  int32_t s, hk, h0, gc, r0, r1;  // tile: rows [r0, r1) of s, heads h0 .. h0 + gc of kv head hk's group;
                                  // decode: the row of s, every head
  int64_t klo, khi;                // decode: the keys of this item (a split's share)
  int64_t slot;                    // decode: its split partial's slot, -1 when it writes out itself
  bool decode;
};

struct Split {
  int64_t s, first_slot, n;
};

struct Plan {
  std::vector<Item> items;
  std::vector<Split> splits;
  std::vector<float> partials;  // [slots][H * (2 + Dp)]: a split's running maxima, sums and accumulators
  int64_t total = 0;
};

struct Scratch {  // one per thread, grown to the largest call and reused
  std::vector<float> a, b, c, d, e, f, zero, qb;  // qb: decode q rows kept in bf16
  float* grow(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// ---- decode rows: lanes over D ----

// Lane j of the result = the sum of the lanes of v[j], for W vectors: a transposing reduction tree
// (log2 W levels, each halving the partial sums a key has and doubling the keys a vector holds, in an
// order that ends with key j in lane j), about a third of the work of W separate horizontal sums.
inline vf sum_lanes(vf* v) {
#if defined(__AVX512F__)
  for (int j = 0; j < 8; ++j)
    v[j] = __builtin_shufflevector(v[j], v[j + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[j], v[j + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    v[j] = __builtin_shufflevector(v[j], v[j + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(v[j], v[j + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    v[j] = __builtin_shufflevector(v[j], v[j + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(v[j], v[j + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(v[0], v[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(v[0], v[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
#else
  for (int j = 0; j < 4; ++j)
    v[j] = __builtin_shufflevector(v[j], v[j + 4], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[j], v[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int j = 0; j < 2; ++j)
    v[j] = __builtin_shufflevector(v[j], v[j + 2], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(v[j], v[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
#endif
}

// s[g * KD + j] = qf_g . k_j[off :] for the gc query heads (rows of dp floats) and nk keys; with NV
// fixed, W keys at a time, their W dot products summed across lanes together (`sum_lanes`). Entries
// past nk (up to the next multiple of W) are written too (zero); the softmax overwrites them.
template <int NV>
void qk_decode(const float* qf, int gc, int64_t dp, const float* const* kp, int64_t off, int nk, float* s) {
  const int64_t nv = NV ? NV : dp / W;
  for (int g = 0; g < gc; ++g) {
    const float* qg = qf + g * dp;
    float* sg = s + g * KD;
    if constexpr (NV > 0) {
      vf qv[NV];
      for (int v = 0; v < NV; ++v) qv[v] = load(qg + v * W);
      for (int j0 = 0; j0 < nk; j0 += W) {
        vf acc[W];
        for (int j = 0; j < W; ++j) {
          if (j0 + j >= nk) {
            acc[j] = vf{};
            continue;
          }
          const float* k = kp[j0 + j] + off;
          acc[j] = qv[0] * load(k);
          for (int v = 1; v < NV; ++v) acc[j] += qv[v] * load(k + v * W);
        }
        store(sg + j0, sum_lanes(acc));
      }
    } else {
      for (int j = 0; j < nk; ++j) {
        vf acc = {};
        for (int64_t v = 0; v < nv; ++v) acc += load(qg + v * W) * load(kp[j] + off + v * W);
        sg[j] = hsum(acc);
      }
    }
  }
}

#if defined(__AVX512BF16__)
// qk_decode for bf16 q and cache rows on avx512_bf16: vdpbf16ps straight on the cache rows (no widening of
// K; exact products, float32 sums), q unscaled (scaling first would round it) and the scores scaled
// after. qb: the gc heads' q rows of D bf16 (D a multiple of 32), kp: the keys' cache rows.
template <int NB>
void qk_decode_bf16(const c10::BFloat16* qb, int gc, int64_t D, const c10::BFloat16* const* kp, int64_t off,
                    int nk, float scale, float* s) {
  const int64_t nb = NB ? NB : D / 32;
  for (int g = 0; g < gc; ++g) {
    const c10::BFloat16* qg = qb + g * D;
    float* sg = s + g * KD;
    for (int j0 = 0; j0 < nk; j0 += W) {
      vf acc[W];
      for (int j = 0; j < W; ++j) {
        __m512 a = _mm512_setzero_ps();
        if (j0 + j < nk) {
          const c10::BFloat16* k = kp[j0 + j] + off;
          for (int64_t v = 0; v < nb; ++v)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + v * 32),
                                 (__m512bh)_mm512_loadu_si512(k + v * 32));
        }
        acc[j] = (vf)a;
      }
      store(sg + j0, sum_lanes(acc) * scale);
    }
  }
}
#endif

constexpr int VECTOR_REGISTERS = W == 16 ? 32 : 16;  // zmm0-31 with AVX-512, ymm0-15 with AVX2
constexpr bool fits_group(int nv, int gc) { return (gc + 1) * nv + 1 <= VECTOR_REGISTERS; }

// pv_decode for GC heads and NV vectors at compile time: each V row is loaded once for all GC heads
// (their accumulators, GC * NV vectors, stay in registers across the block's keys).
template <int NV, int GC>
void pv_decode_group(const float* p, const float* const* vp, int64_t off, int nk, float* acc,
                     const float* alpha, int64_t dp) {
  vf a[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int v = 0; v < NV; ++v) a[g][v] = load(acc + g * dp + v * W) * alpha[g];
  for (int j = 0; j < nk; ++j) {
    const float* vr = vp[j] + off;
    vf vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = load(vr + v * W);
    for (int g = 0; g < GC; ++g) {
      const vf pj = broadcast(p[g * KD + j]);
      for (int v = 0; v < NV; ++v) a[g][v] += pj * vv[v];
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int v = 0; v < NV; ++v) store(acc + g * dp + v * W, a[g][v]);
}

// acc_g = acc_g * alpha_g + sum_j p[g * KD + j] * v_j[off :] for the gc heads.
template <int NV>
void pv_decode(const float* p, int gc, int64_t dp, const float* const* vp, int64_t off, int nk, float* acc,
               const float* alpha) {
  // Groups of 2-4 heads whose accumulators fit the vector registers with a V row and a broadcast.
  if constexpr (NV > 0) {
    if (gc == 2 && fits_group(NV, 2)) return pv_decode_group<NV, 2>(p, vp, off, nk, acc, alpha, dp);
    if (gc == 3 && fits_group(NV, 3)) return pv_decode_group<NV, 3>(p, vp, off, nk, acc, alpha, dp);
    if (gc == 4 && fits_group(NV, 4)) return pv_decode_group<NV, 4>(p, vp, off, nk, acc, alpha, dp);
  }
  const int64_t nv = NV ? NV : dp / W;
  for (int g = 0; g < gc; ++g) {
    float* ag = acc + g * dp;
    const float* pg = p + g * KD;
    if constexpr (NV > 0) {
      vf a[NV];
      for (int v = 0; v < NV; ++v) a[v] = load(ag + v * W) * alpha[g];
      for (int j = 0; j < nk; ++j) {
        const vf pj = broadcast(pg[j]);
        const float* vr = vp[j] + off;
        for (int v = 0; v < NV; ++v) a[v] += pj * load(vr + v * W);
      }
      for (int v = 0; v < NV; ++v) store(ag + v * W, a[v]);
    } else {
      for (int64_t v = 0; v < nv; ++v) {
        vf a = load(ag + v * W) * alpha[g];
        for (int j = 0; j < nk; ++j) a += broadcast(pg[j]) * load(vp[j] + off + v * W);
        store(ag + v * W, a);
      }
    }
  }
}

using QkFn = void (*)(const float*, int, int64_t, const float* const*, int64_t, int, float*);
using PvFn = void (*)(const float*, int, int64_t, const float* const*, int64_t, int, float*, const float*);

std::pair<QkFn, PvFn> pick_decode(int64_t nv) {
  switch (nv) {
    case 1: return {&qk_decode<1>, &pv_decode<1>};
    case 2: return {&qk_decode<2>, &pv_decode<2>};
    case 3: return {&qk_decode<3>, &pv_decode<3>};
    case 4: return {&qk_decode<4>, &pv_decode<4>};
    case 5: return {&qk_decode<5>, &pv_decode<5>};
    case 6: return {&qk_decode<6>, &pv_decode<6>};
    case 8: return {&qk_decode<8>, &pv_decode<8>};
    case 16: return {&qk_decode<16>, &pv_decode<16>};
    default: return {&qk_decode<0>, &pv_decode<0>};  // D past the instances: runtime loops
  }
}

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 1);
}

// The online softmax over one block of nk scores per head (rows of KD in s, made probabilities): m and
// l are each head's running max and sum, alpha the factor its accumulators are to be rescaled by.
void softmax_block(float* s, int64_t H, int nk, float* m, float* l, float* alpha) {
  const int nvk = (nk + W - 1) / W;
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s + h * KD;
    for (int j = nk; j < nvk * W; ++j) sh[j] = NEG_INF;
    vf mx = load(sh);
    for (int v = 1; v < nvk; ++v) mx = vmax(mx, load(sh + v * W));
    const float mn = std::max(m[h], hmax(mx));  // finite: the block has a key
    alpha[h] = std::exp(m[h] - mn);
    vf sum = {};
    for (int v = 0; v < nvk; ++v) {
      const vf e = vexp(load(sh + v * W) - mn);
      store(sh + v * W, e);
      sum += e;
    }
    l[h] = l[h] * alpha[h] + hsum(sum);
    m[h] = mn;
  }
}

// One decode row's keys [it.klo, it.khi) for all H heads: each key's K/V row (every kv head, contiguous
// in the cache) is read once.
template <class X>
void decode_item(const Args& a, const Item& it, float* partials) {
  const int64_t D = a.D, dp = a.Dp, G = a.G, H = a.H, Hkv = a.Hkv, rp = Hkv * dp;  // rp: a widened row
  Scratch& sc = scratch();
  float* qf = sc.grow(sc.a, H * dp);   // [H][dp] q * scale, zero tail
  float* acc = sc.grow(sc.b, H * dp);  // [H][dp]
  float* s = sc.grow(sc.c, H * KD);    // [H][KD] scores, then probabilities
  float* kb = sc.grow(sc.d, KD * rp);  // [KD][H_kv][dp] widened K rows (zero tails)
  float* vb = sc.grow(sc.e, KD * rp);
  float* stat = sc.grow(sc.f, 3 * H);  // m [H], l [H], alpha [H]
  float *m = stat, *l = stat + H, *alpha = stat + 2 * H;
  const int64_t row = a.qs[it.s];
  const X* q = static_cast<const X*>(a.q);
#if defined(__AVX512BF16__)
  // bf16 with D a multiple of 32: QK^T by vdpbf16ps on q as it is (unscaled, in qb) and on the cache
  // rows (qk_decode_bf16), K not widened.
  const bool raw_k = std::is_same_v<X, c10::BFloat16> && D % 32 == 0;
  c10::BFloat16* qb = reinterpret_cast<c10::BFloat16*>(sc.grow(sc.qb, (H * D + 1) / 2));  // [H][D]
  const c10::BFloat16* kr[KD];
#else
  constexpr bool raw_k = false;
#endif
  for (int64_t h = 0; h < H; ++h) {
    const X* qr = q + row * a.q_s0 + h * a.q_s1;
#if defined(__AVX512BF16__)
    if (raw_k)
      std::memcpy(qb + h * D, qr, D * sizeof(X));
    else
#endif
      for (int64_t d = 0; d < dp; ++d) qf[h * dp + d] = d < D ? to_float(qr[d]) * a.scale : 0.f;
    m[h] = NEG_INF;
    l[h] = 0.f;
  }
  std::fill(acc, acc + H * dp, 0.f);
  if (dp != D)
    for (int64_t r = 0; r < KD * Hkv; ++r) {
      std::fill(kb + r * dp + D, kb + (r + 1) * dp, 0.f);
      std::fill(vb + r * dp + D, vb + (r + 1) * dp, 0.f);
    }
  const auto [qk, pv] = pick_decode(dp / W);
  const X* kc = static_cast<const X*>(a.kc);
  const X* vc = static_cast<const X*>(a.vc);
  const int64_t row_bytes = a.row_stride * sizeof(X);
  const int32_t* table = a.bt + it.s * a.bt_s0;
  Cursor cur(table, a.BS, it.klo), ahead(table, a.BS, std::min(it.khi - 1, it.klo + AHEAD));
  {
    // The item's first AHEAD keys are fetched all at once before any is read: the loop below fetches
    // AHEAD keys ahead of the one it reads, so without this the first AHEAD wait on memory one by one
    // (a quarter of a 256-token context).
    Cursor first(table, a.BS, it.klo);
    for (int64_t k = it.klo; k < std::min(it.khi, it.klo + AHEAD); ++k) {
      const int64_t off = first.next() * a.row_stride;
      prefetch_row(kc + off, row_bytes);
      prefetch_row(vc + off, row_bytes);
    }
  }
  const float* kp[KD];
  const float* vp[KD];
  for (int64_t k0 = it.klo; k0 < it.khi; k0 += KD) {
    const int nk = static_cast<int>(std::min<int64_t>(KD, it.khi - k0));
    for (int j = 0; j < nk; ++j) {
      // The row KD keys on is fetched meanwhile: rows of different blocks are scattered, beyond the
      // hardware prefetcher's reach.
      if (k0 + AHEAD + j < it.khi) {
        const int64_t ahead_off = ahead.next() * a.row_stride;
        prefetch_row(kc + ahead_off, row_bytes);
        prefetch_row(vc + ahead_off, row_bytes);
      }
      const int64_t off = cur.next() * a.row_stride;
      if constexpr (std::is_same_v<X, float>) {
        if (a.direct) {  // dp == D: the cache row as it is
          kp[j] = kc + off;
          vp[j] = vc + off;
          continue;
        }
      }
#if defined(__AVX512BF16__)
      if (raw_k) kr[j] = reinterpret_cast<const c10::BFloat16*>(kc + off);
#endif
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        if (!raw_k) widen(kc + off + hk * D, kb + j * rp + hk * dp, D);
        widen(vc + off + hk * D, vb + j * rp + hk * dp, D);
      }
      kp[j] = kb + j * rp;
      vp[j] = vb + j * rp;
    }
#if defined(__AVX512BF16__)
    if (raw_k) {
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        float* sk = s + hk * G * KD;
        if (D == 64) qk_decode_bf16<2>(qb + hk * G * D, G, D, kr, hk * D, nk, a.scale, sk);
        else qk_decode_bf16<0>(qb + hk * G * D, G, D, kr, hk * D, nk, a.scale, sk);
      }
    } else
#endif
      for (int64_t hk = 0; hk < Hkv; ++hk) qk(qf + hk * G * dp, G, dp, kp, hk * dp, nk, s + hk * G * KD);
    softmax_block(s, H, nk, m, l, alpha);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      pv(s + hk * G * KD, G, dp, vp, hk * dp, nk, acc + hk * G * dp, alpha + hk * G);
  }
  if (it.slot >= 0) {  // a split's share: merged by merge_splits
    float* part = partials + it.slot * H * (2 + dp);
    std::memcpy(part, m, 2 * H * sizeof(float));
    std::memcpy(part + 2 * H, acc, H * dp * sizeof(float));
    return;
  }
  X* out = static_cast<X*>(a.out);
  for (int64_t h = 0; h < H; ++h) {
    X* orow = out + row * a.o_s0 + h * a.o_s1;
    const float inv = 1.f / l[h];
    for (int64_t d = 0; d < D; ++d) orow[d] = from_float<X>(acc[h * dp + d] * inv);
  }
}

template <class X>
void merge_splits(const Args& a, const Plan& pl) {
  const int64_t G = a.H, dp = a.Dp, D = a.D, ps = G * (2 + dp);  // G: every head of the row here
  X* out = static_cast<X*>(a.out);
  for (const Split& sp : pl.splits) {
    const float* base = pl.partials.data() + sp.first_slot * ps;
    const int64_t row = a.qs[sp.s];
    for (int64_t g = 0; g < G; ++g) {
      float mx = NEG_INF, sum = 0.f;
      for (int64_t i = 0; i < sp.n; ++i) mx = std::max(mx, base[i * ps + g]);
      float w[64];  // sp.n <= 64 (make_plan)
      for (int64_t i = 0; i < sp.n; ++i) {
        w[i] = std::exp(base[i * ps + g] - mx);
        sum += w[i] * base[i * ps + G + g];
      }
      X* orow = out + row * a.o_s0 + g * a.o_s1;
      for (int64_t d = 0; d < D; ++d) {
        float o = 0.f;
        for (int64_t i = 0; i < sp.n; ++i) o += w[i] * base[i * ps + 2 * G + g * dp + d];
        orow[d] = from_float<X>(o / sum);
      }
    }
  }
}

// ---- prompt and chunk rows: lanes over the tile's queries ----

// S[j] = sum_d QT[d] * k_j[d] for the KT keys (rows of D floats in kb). DT: D when known at compile time,
// so the KT rows are constant offsets from one pointer.
template <int DT>
inline void qk_tile(const float* QT, const float* kb, int64_t D_rt, vf* S) {
  const int64_t D = DT ? DT : D_rt;
  vf acc[KT] = {};
  for (int64_t d = 0; d < D; ++d) {
    const vf qv = load(QT + d * W);
    for (int j = 0; j < KT; ++j) acc[j] += qv * kb[j * D + d];
  }
  for (int j = 0; j < KT; ++j) S[j] = acc[j];
}

#if defined(__AVX512BF16__)
// The same for bf16 q and K on CPUs with avx512_bf16 (Xeon since Cooper Lake, Zen 4): vdpbf16ps multiplies
// pairs of bf16 exactly and adds them into float32 lanes, half the instructions of the widened path and
// no widening of K. QT2 [D / 2][W]: lane l's pair (q[2p], q[2p + 1]) unscaled (scaling first would round
// q), kb [KT][D] bf16 rows. (Inputs below 2^-126 count as zero, far below attention's values.)
template <int DT>
inline void qk_tile_bf16(const uint32_t* QT2, const c10::BFloat16* kb, int64_t D_rt, float scale, vf* S) {
  const int64_t D = DT ? DT : D_rt;
  __m512 acc[KT];
  for (int j = 0; j < KT; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(QT2 + p * W);
    for (int j = 0; j < KT; ++j) {
      uint32_t pair;
      std::memcpy(&pair, kb + j * D + 2 * p, sizeof pair);
      acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_set1_epi32(pair));
    }
  }
  for (int j = 0; j < KT; ++j) S[j] = (vf)acc[j] * scale;
}
constexpr bool DPBF16 = true;
#else
constexpr bool DPBF16 = false;
#endif

// OT[d] = OT[d] * alpha + sum_j P[j] * v_j[d].
template <int DT>
inline void pv_tile(const vf* P, const float* vb, int64_t D_rt, float* OT, vf alpha) {
  const int64_t D = DT ? DT : D_rt;
  for (int64_t d = 0; d < D; d += DB) {
    vf acc[DB];
    for (int b = 0; b < DB; ++b) acc[b] = load(OT + (d + b) * W) * alpha;
    for (int j = 0; j < KT; ++j) {
      const vf pj = P[j];
      const float* vr = vb + j * D + d;
      for (int b = 0; b < DB; ++b) acc[b] += pj * vr[b];
    }
    for (int b = 0; b < DB; ++b) store(OT + (d + b) * W, acc[b]);
  }
}

// One tile's state: its rows' positions, queries and running softmax (see tile_item).
struct Tile {
  float *QT, *OT;   // [D][W] q * scale (or [D / 2][W] bf16 pairs), [D][W] accumulators
  vi plim, wlim;    // each lane's row position, and the window's bound below it
  vf m, l;          // running max and sum per lane
  int64_t pb, pe;   // the first and last row's positions
  int64_t row0, M;  // its first q row, query vectors (lanes)
};

// Keys [k0, k0 + KT) (rows in kb, vb) for one tile: QK^T, the mask where the block needs one, the
// online softmax (vertical: lanes are queries) and P.V. A block past the tile's rows or below its
// window is skipped.
template <int DT, bool dp16>
inline void tile_block(Tile& tl, const float* kb, const float* vb, int64_t k0, int64_t win, int64_t D,
                       [[maybe_unused]] float scale) {
  if (k0 > tl.pe || (win && k0 + KT - 1 <= tl.pb - win)) return;
  vf S[KT];
#if defined(__AVX512BF16__)
  if constexpr (dp16)
    qk_tile_bf16<DT>(reinterpret_cast<const uint32_t*>(tl.QT), reinterpret_cast<const c10::BFloat16*>(kb), D,
                     scale, S);
  else
#endif
    qk_tile<DT>(tl.QT, kb, D, S);
  if (k0 + KT - 1 > tl.pb || (win && k0 <= tl.pe - win)) {  // on the diagonal or the window's edge
    for (int j = 0; j < KT; ++j) {
      const vi kv = broadcast_i(static_cast<int32_t>(k0 + j));
      vi ok = kv <= tl.plim;
      if (win) ok &= kv > tl.wlim;
      S[j] = ok ? S[j] : broadcast(NEG_INF);
    }
  }
  vf mt = S[0];
  for (int j = 1; j < KT; ++j) mt = vmax(mt, S[j]);
  const vf mn = vmax(tl.m, mt);
  const vf ref = mn == broadcast(NEG_INF) ? vf{} : mn;  // a lane with no key yet: all its terms are 0
  const vf alpha = vexp(tl.m - ref);
  vf sum = {};
  for (int j = 0; j < KT; ++j) {
    S[j] = vexp(S[j] - ref);
    sum += S[j];
  }
  tl.l = tl.l * alpha + sum;
  tl.m = mn;
  pv_tile<DT>(S, vb, D, tl.OT, alpha);
}

// Rows [r0, r1) of sequence s for heads h0 .. h0 + gc of kv head hk's group, as up to NT tiles of R rows
// (R * gc <= W lanes): each block of keys is widened once and used by every tile it reaches.
template <class X, int DT>
void tile_item(const Args& a, const Item& it) {
  const int64_t D = DT ? DT : a.D;
  const int gc = it.gc, R = std::max(1, W / gc);
  const int nt = (it.r1 - it.r0 + R - 1) / R;
  Scratch& sc = scratch();
  float* qt_all = sc.grow(sc.a, nt * D * W);
  float* ot_all = sc.grow(sc.b, nt * D * W);
  float* kb = sc.grow(sc.d, KT * D);  // [KT][D] widened K rows (or bf16 rows, dp16)
  float* vb = sc.grow(sc.e, KT * D);
  const int64_t ctx = a.cl[it.s], n = a.qs[it.s + 1] - a.qs[it.s], base = ctx - n, win = a.window;
  const int64_t h_first = it.hk * a.G + it.h0;
  const X* q = static_cast<const X*>(a.q);
  constexpr bool dp16 = DPBF16 && std::is_same_v<X, c10::BFloat16>;  // QK^T by vdpbf16ps
  c10::BFloat16* kb16 = reinterpret_cast<c10::BFloat16*>(kb);
  Tile tiles[NT];
  for (int t = 0; t < nt; ++t) {
    Tile& tl = tiles[t];
    const int64_t r0 = it.r0 + t * R, r1 = std::min<int64_t>(it.r1, r0 + R);
    tl = Tile{qt_all + t * D * W, ot_all + t * D * W, vi{}, vi{}, broadcast(NEG_INF), vf{},
              base + r0, base + r1 - 1, a.qs[it.s] + r0, (r1 - r0) * gc};
    std::fill(tl.QT, tl.QT + D * W, 0.f);
    std::fill(tl.OT, tl.OT + D * W, 0.f);
    uint32_t* QT2 = reinterpret_cast<uint32_t*>(tl.QT);
    alignas(64) int32_t pos[W];  // unused lanes take the last row's position
    for (int ln = 0; ln < W; ++ln) {
      pos[ln] = static_cast<int32_t>(tl.pe);
      if (ln >= tl.M) continue;
      const int r = ln / gc, g = ln % gc;
      const X* qr = q + (tl.row0 + r) * a.q_s0 + (h_first + g) * a.q_s1;
      if constexpr (dp16) {
        for (int64_t p = 0; p < D / 2; ++p) std::memcpy(QT2 + p * W + ln, qr + 2 * p, sizeof(uint32_t));
      } else {
        for (int64_t d = 0; d < D; ++d) tl.QT[d * W + ln] = to_float(qr[d]) * a.scale;
      }
      pos[ln] = static_cast<int32_t>(tl.pb + r);
    }
    std::memcpy(&tl.plim, pos, sizeof tl.plim);
    tl.wlim = tl.plim - static_cast<int32_t>(win);  // a key must lie above p - window
  }
  const int64_t klo = win ? std::max<int64_t>(0, tiles[0].pb - win + 1) : 0, khi = tiles[nt - 1].pe + 1;
  const X* kc = static_cast<const X*>(a.kc) + it.hk * D;
  const X* vc = static_cast<const X*>(a.vc) + it.hk * D;
  Cursor cur(a.bt + it.s * a.bt_s0, a.BS, klo);
  for (int64_t k0 = klo; k0 < khi; k0 += KT) {
    const int nk = static_cast<int>(std::min<int64_t>(KT, khi - k0));
    for (int j = 0; j < nk; ++j) {
      const int64_t off = cur.next() * a.row_stride;
      if constexpr (dp16)
        std::memcpy(kb16 + j * D, kc + off, D * sizeof(X));
      else
        widen(kc + off, kb + j * D, D);
      widen(vc + off, vb + j * D, D);
    }
    if (nk < KT) {  // the last block: zero rows for the missing keys (masked below: they lie past pe)
      if constexpr (dp16)
        std::fill(kb16 + nk * D, kb16 + KT * D, c10::BFloat16(0.f));
      else
        std::fill(kb + nk * D, kb + KT * D, 0.f);
      std::fill(vb + nk * D, vb + KT * D, 0.f);
    }
    for (int t = 0; t < nt; ++t) tile_block<DT, dp16>(tiles[t], kb, vb, k0, win, D, a.scale);
  }
  X* out = static_cast<X*>(a.out);
  for (int t = 0; t < nt; ++t) {
    const Tile& tl = tiles[t];
    const vf inv = 1.f / tl.l;
    for (int ln = 0; ln < tl.M; ++ln) {
      X* orow = out + (tl.row0 + ln / gc) * a.o_s0 + (h_first + ln % gc) * a.o_s1;
      for (int64_t d = 0; d < D; ++d) orow[d] = from_float<X>(tl.OT[d * W + ln] * inv[ln]);
    }
  }
}

// ---- planning ----

void make_plan(Plan& pl, const Args& a, int threads) {
  pl.items.clear();
  pl.splits.clear();
  pl.total = 0;
  const int64_t nv = a.Dp / W;
  const int64_t decode_cost = (2 * a.G * nv + 8 * a.G + 4 * nv) * a.Hkv;  // per key: FMAs, sums, widening
  const int64_t tile_cost = 2 * a.D + 4 * nv;
  const int gc_max = static_cast<int>(std::min<int64_t>(a.G, W));
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t n = a.qs[s + 1] - a.qs[s], ctx = a.cl[s], base = ctx - n;
    if (n == 0) continue;
    if (n == 1) {
      const int64_t klo = a.window ? std::max<int64_t>(0, ctx - a.window) : 0;
      pl.items.push_back({(ctx - klo) * decode_cost, (int32_t)s, 0, 0, (int32_t)a.H, 0, 1, klo, ctx, -1, true});
      continue;
    }
    for (int64_t hk = 0; hk < a.Hkv; ++hk) {
      for (int h0 = 0; h0 < a.G; h0 += gc_max) {
        const int gc = static_cast<int>(std::min<int64_t>(gc_max, a.G - h0)), R = std::max(1, W / gc);
        for (int64_t r0 = 0; r0 < n; r0 += R * NT) {
          const int64_t r1 = std::min(n, r0 + R * NT);
          int64_t cost = 0;  // each tile's keys
          for (int64_t t0 = r0; t0 < r1; t0 += R) {
            const int64_t pb = base + t0, pe = base + std::min(r1, t0 + R) - 1;
            cost += (pe + 1 - (a.window ? std::max<int64_t>(0, pb - a.window + 1) : 0)) * tile_cost;
          }
          pl.items.push_back({cost, (int32_t)s, (int32_t)hk, h0, gc, (int32_t)r0, (int32_t)r1, 0, 0, -1, false});
        }
      }
    }
  }
  for (const Item& it : pl.items) pl.total += it.cost;
  int64_t slots = 0;
  if (threads > 1 && pl.total >= SERIAL_COST) {
    // Split-K: a decode row much costlier than a fair share (a quarter of a thread's) is cut into
    // shares of its keys, so that long contexts at small batch keep every thread busy.
    const int64_t target = std::max(pl.total / (4 * threads), MIN_SPLIT_KEYS * decode_cost);
    const size_t count = pl.items.size();
    for (size_t i = 0; i < count; ++i) {
      Item& it = pl.items[i];
      const int64_t keys = it.khi - it.klo;
      const int64_t parts = std::min<int64_t>({it.cost / target, keys / MIN_SPLIT_KEYS, 64});
      if (!it.decode || parts < 2) continue;
      const int64_t share = (keys + parts - 1) / parts;
      pl.splits.push_back({it.s, slots, 0});
      const Item whole = it;
      for (int64_t k = whole.klo; k < whole.khi; k += share) {
        Item piece = whole;
        piece.klo = k;
        piece.khi = std::min(whole.khi, k + share);
        piece.cost = (piece.khi - piece.klo) * decode_cost;
        piece.slot = slots++;
        ++pl.splits.back().n;
        if (k == whole.klo)
          pl.items[i] = piece;
        else
          pl.items.push_back(piece);
      }
    }
  }
  pl.partials.resize(slots * a.H * (2 + a.Dp));
  std::sort(pl.items.begin(), pl.items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

template <class X>
void run(const Args& a, const Plan& pl) {
  float* partials = const_cast<float*>(pl.partials.data());
  auto work = [&](const Item& it) {
    if (it.decode) return decode_item<X>(a, it, partials);
    if (a.D == 64) return tile_item<X, 64>(a, it);
    if (a.D == 128) return tile_item<X, 128>(a, it);
    tile_item<X, 0>(a, it);
  };
  const int threads = at::get_num_threads();
  const size_t count = pl.items.size();
  if (threads <= 1 || count <= 1 || pl.total < SERIAL_COST) {
    for (const Item& it : pl.items) work(it);
  } else {
    std::atomic<size_t> next{0};  // largest first, each thread takes the next item when done
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) work(pl.items[i]);
    });
  }
  merge_splits<X>(a, pl);
}

bool is_16_or_32(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Validates every argument (ValueError naming it) and every block id that will be read.
Args check(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
           const at::Tensor& qs, const at::Tensor& cl, double scale, int64_t window, const at::Tensor& out) {
  TORCH_CHECK_VALUE(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1 && is_16_or_32(q.scalar_type()),
                    "q: need [T, H, D] float32, bfloat16 or float16 on the CPU with contiguous heads, got ",
                    q.sizes(), " ", q.dtype(), " ", q.device());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(D % 8 == 0 && D > 0, "q: head_dim D = ", D, " must be a positive multiple of 8");
  TORCH_CHECK_VALUE(kc.dim() == 4 && kc.is_contiguous() && kc.dtype() == q.dtype() && kc.size(3) == D &&
                        kc.device().is_cpu(),
                    "key_cache: need [num_blocks, block_size, H_kv, D = ", D, "] contiguous ", q.dtype(),
                    ", got ", kc.sizes(), " ", kc.dtype());
  TORCH_CHECK_VALUE(vc.sizes() == kc.sizes() && vc.is_contiguous() && vc.dtype() == q.dtype() &&
                        vc.device().is_cpu(),
                    "value_cache: need ", kc.sizes(), " contiguous ", q.dtype(), " as key_cache, got ", vc.sizes(),
                    " ", vc.dtype());
  const int64_t NB = kc.size(0), BS = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK_VALUE(BS > 0 && Hkv > 0 && H % Hkv == 0, "key_cache: H_kv = ", Hkv, " must divide q's H = ", H,
                    " (block_size ", BS, ")");
  TORCH_CHECK_VALUE(cl.dtype() == at::kInt && cl.dim() == 1 && cl.is_contiguous() && cl.device().is_cpu(),
                    "context_lens: need [S] int32, got ", cl.sizes(), " ", cl.dtype());
  const int64_t S = cl.size(0);
  TORCH_CHECK_VALUE(qs.dtype() == at::kInt && qs.dim() == 1 && qs.is_contiguous() && qs.size(0) == S + 1 &&
                        qs.device().is_cpu(),
                    "query_starts: need [S + 1 = ", S + 1, "] int32, got ", qs.sizes(), " ", qs.dtype());
  TORCH_CHECK_VALUE(bt.dtype() == at::kInt && bt.dim() == 2 && bt.size(0) == S && bt.stride(1) == 1 &&
                        bt.device().is_cpu(),
                    "block_tables: need [S = ", S, ", max_blocks] int32 with contiguous rows, got ", bt.sizes(), " ",
                    bt.dtype());
  TORCH_CHECK_VALUE(out.dim() == 3 && out.sizes() == q.sizes() && out.dtype() == q.dtype() && out.stride(2) == 1 &&
                        out.device().is_cpu(),
                    "out: need ", q.sizes(), " ", q.dtype(), " with contiguous heads, got ", out.sizes(), " ",
                    out.dtype());
  TORCH_CHECK_VALUE(window >= 0, "sliding_window: need >= 0 (0: none), got ", window);
  const int32_t *qsp = qs.data_ptr<int32_t>(), *clp = cl.data_ptr<int32_t>(), *btp = bt.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(qsp[0] == 0 && qsp[S] == T, "query_starts: need query_starts[0] = 0 and query_starts[S] = T = ",
                    T, ", got ", qsp[0], " and ", qsp[S]);
  const int64_t max_blocks = bt.size(1);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = qsp[s + 1] - qsp[s], ctx = clp[s];
    TORCH_CHECK_VALUE(n >= 0, "query_starts: need non-decreasing, got query_starts[", s, "] = ", qsp[s], " > ",
                      "query_starts[", s + 1, "] = ", qsp[s + 1]);
    TORCH_CHECK_VALUE(ctx >= n, "context_lens[", s, "] = ", ctx, " is below the sequence's ", n,
                      " query rows (it counts them too)");
    if (n == 0) continue;
    TORCH_CHECK_VALUE((ctx + BS - 1) / BS <= max_blocks, "block_tables: sequence ", s, " needs ",
                      (ctx + BS - 1) / BS, " blocks for ", ctx, " tokens, the table has ", max_blocks, " columns");
    const int64_t first = window ? std::max<int64_t>(0, ctx - n - window + 1) : 0;  // the first key read
    for (int64_t j = first / BS; j <= (ctx - 1) / BS; ++j) {
      const int32_t b = btp[s * bt.stride(0) + j];
      TORCH_CHECK_VALUE(b >= 0 && b < NB, "block_tables[", s, ", ", j, "] = ", b, " is outside the cache's [0, ",
                        NB, ") blocks");
    }
  }
  // In Args' declaration order.
  return Args{q.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), q.stride(0), q.stride(1),
              out.stride(0), out.stride(1), btp, qsp, clp, bt.stride(0), S, H, Hkv, H / Hkv, D,
              (D + W - 1) / W * W, BS, Hkv * D, static_cast<float>(scale), window,
              q.scalar_type() == at::kFloat && D % W == 0};
}

}  // namespace

// out[T, H, D] = paged attention of q over the cache through the block tables (see the header).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& context_lens, double scale, int64_t sliding_window,
                           std::optional<at::Tensor> out) {
  at::Tensor o = out.has_value() ? *out : at::empty(q.sizes(), q.options());
  const Args a = check(q, key_cache, value_cache, block_tables, query_starts, context_lens, scale, sliding_window, o);
  if (q.size(0) == 0) return o;
  thread_local Plan plan;
  Plan& pl = plan;
  make_plan(pl, a, at::get_num_threads());
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(a, pl); break;
    case at::kBFloat16: run<c10::BFloat16>(a, pl); break;
    case at::kHalf: run<c10::Half>(a, pl); break;
    default: TORCH_CHECK(false, "unreachable: q's dtype was checked");
  }
  return o;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own ops run: the server's other Python threads go on meanwhile.
  m.def("paged_attention", &paged_attention,
        "out [T, H, D] = attention of q over the paged KV cache through the block tables (attention_cpu.cpp)",
        py::arg("q"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("query_starts"), py::arg("context_lens"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
}
