// fused_cpu.cpp: the small elementwise ops between a decoder layer's linears, one native call each on the
// CPU instead of several eager torch ops (each op costs microseconds of dispatch: at batch 1 the small ops
// cost as much as streaming the weights). Compiled on first use by torch.utils.cpp_extension.load with
// -O3 -march=<the build machine's own>; worker/kernels/cpu_fused.py builds, caches and wraps it.
//
// Semantics (worker/kernels/reference.py is the spec; X is the model dtype: float, bfloat16 or half):
//   rms_norm(x, w, eps) -> out          out = w * X(rms_norm(float(x)))        HF's rounding: normalise in
//   add_rms_norm_(x, res, w, eps)      res = X(x + res); x = rms_norm(res)    float32, round to X, then
//                                      (in place: both inputs are written)    the weight multiplies in X
//   silu_mul(gate_up) -> out           out = X(X(silu(float(gate))) * up)     torch's bf16 F.silu then *
//   rotary(x, cos, sin) -> out         out = X(X(x * cos) + X(rotate_half(x) * sin))   as torch's 3 ops
//   rotary_cos_sin(pos, inv_freq, s)   cos/sin = X(cos/sin(float(pos) * inv_freq) * s), halves repeated
// with rms_norm(v) = v * (1 / sqrt(sum(v^2) / h + eps)) in float32 and silu(g) = g / (1 + exp(-g)).
// Every X(...) is a rounding to the model dtype where torch's separate ops round (round to nearest even),
// a no-op for float X. Measured against the references: in bf16 the add, silu * up, the rotation and the
// cos / sin tables are bit-equal, rms_norm differs in ~1e-5 of elements by one rounding (torch's float32
// sum runs in another order); in float32 every op is within ~1.5e-6 (the sum's order, exp to 2 ulp,
// glibc's sincosf against torch's Sleef cos and sin to an ulp; tables of TORCH_SINCOS_ELEMS angles and
// more are torch's own), the rotation bit-equal.
//
// Layouts (innermost dimension contiguous, other strides in elements):
//   x, res, out   [T, h]            rows at x.stride(0) / res.stride(0); out contiguous;  w [h] contiguous
//   gate_up       [T, 2 * I]        gate = columns [0, I), up = [I, 2 I); out [T, I] contiguous
//   x (rotary)    [T, nh, D]        any row and head strides (a view of the qkv output); out contiguous
//   cos, sin      [T, 1, D] or [T, D]  rows at stride(0) (the first D / 2 and last D / 2 columns are read
//                                   as given, not assumed equal)
//   positions     [T] int64;  inv_freq [D / 2] float32, contiguous
//
// Design: one pass over a row per op (rms_norm: a second pass over the row while it is in L1), vectors of
// W float lanes. 16-bit values are widened in registers (bf16 by a shift, fp16 by F16C) and rounded back
// by integer ops (bf16) or F16C, so every rounding torch makes is made here too; float32 intermediates
// pass an empty asm, so that no product is fused into a sum (an FMA) where torch rounds twice. exp is
// Cephes' polynomial (torch's Sleef exp to 2 ulp); scalar tails use std::exp, as torch's do. Rows are
// spread by at::parallel_for only when a call has much work (PARALLEL_WORK): a decode step's calls at
// batch 1 run on the calling thread, with no fork. GCC vector extensions, so one source builds for
// AVX-512 (16 lanes) and AVX2 (8 lanes) alike; intrinsics only under their ISA's macro.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "cpu_vectors.h"

namespace {

using namespace cpu_vectors;

// A call with less work than this (in elements, weighted by their cost: an angle of rotary_cos_sin counts
// 8) runs on the calling thread: torch's own grain for elementwise ops (at::internal::GRAIN_SIZE), so no
// call forks where torch's op would not. A fork and join costs microseconds, and milliseconds when
// another process holds a core (a thread of the team waits for its time slice).
constexpr int64_t PARALLEL_WORK = 1 << 15;
// rotary_cos_sin computes tables of at least this many angles with torch's ops, whose vectorised Sleef
// sin / cos outrun glibc's sincosf there (256 rows of D = 64); the dispatch is then a small share.
constexpr int64_t TORCH_SINCOS_ELEMS = 1 << 13;

template <class T>
inline float round_to(float v) { return to_float(from_float<T>(v)); }  // v as torch stores it in T

// A float32 result kept as rounded: the empty asm makes GCC materialise v, so a product is never fused
// into a following sum (the build's default -ffp-contract=fast would make an FMA, rounding once where
// torch's separate ops round twice).
template <>
inline float round_to<float>(float v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v;
}

// v rounded to T and widened back, in registers: the value torch would hold after an op's output in T.
template <class T>
inline vf round_to(vf v);

template <>
inline vf round_to<float>(vf v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));  // as the scalar round_to<float>: no FMA across it
#endif
  return v;
}

template <>
inline vf round_to<c10::BFloat16>(vf v) { return (vf)(bf16_bits(v) << 16); }

template <>
inline vf round_to<c10::Half>(vf v) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) v[i] = round_to<c10::Half>(v[i]);
  return v;
#endif
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// exp(x) lane by lane (Cephes expf): 2^n * p(r) with n = round(x / ln 2) and r = x - n ln 2 in two parts,
// p a degree-7 polynomial (within 2 ulp). Overflows to inf past 88.72; flushed to 0 below -86.6 (exp is
// below 2^-124 there: 1 + exp(-g) in silu is 1 either way). NaN stays NaN.
inline vf vexp(vf x) {
  const vf hi = broadcast(88.75f), lo = broadcast(-86.6f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const vf magic = broadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  // 2^n in two factors, 2^(n - 1) * 2, so that n = 128 (x just below the overflow) stays finite.
  vi e = (__builtin_convertvector(n, vi) + 126) << 23;
  vf y = p * (vf)e * 2.f;
  return x < lo ? vf{} : y;
}

// ---- rms_norm / add_rms_norm_ ---------------------------------------------------------------------------

// out[:h] = w * X(src * inv) with inv = 1 / sqrt(sum(src^2) / h + eps); src = X(a + b) stored into sum_out
// first where b is given. out may be a (in place).
template <class X>
void norm_row(const X* a, const X* b, X* sum_out, const X* w, X* out, int64_t h, float eps) {
  const X* src = a;
  if (b != nullptr) {
    int64_t k = 0;
    for (; k + W <= h; k += W) store(sum_out + k, load(a + k) + load(b + k));
    for (; k < h; ++k) sum_out[k] = from_float<X>(to_float(a[k]) + to_float(b[k]));
    src = sum_out;
  }
  vf acc = {};
  int64_t k = 0;
  for (; k + W <= h; k += W) {
    vf v = load(src + k);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (; k < h; ++k) ss += to_float(src[k]) * to_float(src[k]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
  k = 0;
  for (; k + W <= h; k += W) store(out + k, load(w + k) * round_to<X>(load(src + k) * inv));
  for (; k < h; ++k) out[k] = from_float<X>(to_float(w[k]) * round_to<X>(to_float(src[k]) * inv));
}

bool is_model_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1 && is_model_dtype(t.scalar_type()),
                    name, ": need [T, h] float32, bfloat16 or float16 on the CPU with contiguous rows, got ",
                    t.sizes(), " ", t.dtype(), " ", t.device(), " strides ", t.strides());
}

void check_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() && w.dtype() == x.dtype(),
                    "weight: need [h = ", x.size(1), "] contiguous ", x.dtype(), ", got ", w.sizes(), " ", w.dtype());
}

// Rows per thread at least, for rows of `row_elems` elements of relative `cost`.
int64_t grain(int64_t row_elems, int64_t cost = 1) {
  return std::max<int64_t>(1, PARALLEL_WORK / std::max<int64_t>(1, row_elems * cost));
}

template <class F>
void dispatch(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "unreachable: the dtype was checked");
  }
}

}  // namespace

// out = w * X(rms_norm(float(x))): the first layer's input norm (no residual yet).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t h = x.size(1), xs = x.stride(0);
  dispatch(x.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    const X* xp = x.data_ptr<X>();
    const X* wp = weight.data_ptr<X>();
    X* op = out.data_ptr<X>();
    at::parallel_for(0, x.size(0), grain(h), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) norm_row<X>(xp + t * xs, nullptr, nullptr, wp, op + t * h, h, eps);
    });
  });
  return out;
}

// residual = X(x + residual), then x = w * X(rms_norm(float(residual))), both in place.
void add_rms_norm_(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.dtype() == x.dtype(), "residual: need ", x.sizes(),
                    " ", x.dtype(), " as x, got ", residual.sizes(), " ", residual.dtype());
  check_weight(weight, x);
  TORCH_CHECK_VALUE(x.size(0) < 2 || x.data_ptr() != residual.data_ptr(), "x and residual are the same tensor");
  const int64_t h = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  dispatch(x.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    X* xp = x.data_ptr<X>();
    X* rp = residual.data_ptr<X>();
    const X* wp = weight.data_ptr<X>();
    at::parallel_for(0, x.size(0), grain(h), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) norm_row<X>(xp + t * xs, rp + t * rs, rp + t * rs, wp, xp + t * xs, h, eps);
    });
  });
}

// ---- silu_mul --------------------------------------------------------------------------------------------

namespace {

template <class X>
void silu_mul_row(const X* g, const X* u, X* out, int64_t n) {
  const vf one = broadcast(1.f);
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    vf gv = load(g + k);
    store(out + k, round_to<X>(gv / (one + vexp(-gv))) * load(u + k));
  }
  for (; k < n; ++k) {
    const float gf = to_float(g[k]);
    out[k] = from_float<X>(round_to<X>(gf / (1.f + std::exp(-gf))) * to_float(u[k]));
  }
}

}  // namespace

// out[t] = X(X(silu(gate[t])) * up[t]) with gate, up = gate_up[t, :I], gate_up[t, I:].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, "gate_up: need an even width [T, 2 * I], got ", gate_up.sizes());
  const int64_t n = gate_up.size(1) / 2, s = gate_up.stride(0);
  at::Tensor out = at::empty({gate_up.size(0), n}, gate_up.options());
  dispatch(gate_up.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    const X* gp = gate_up.data_ptr<X>();
    X* op = out.data_ptr<X>();
    at::parallel_for(0, gate_up.size(0), grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) silu_mul_row<X>(gp + t * s, gp + t * s + n, op + t * n, n);
    });
  });
  return out;
}

// ---- rotary ----------------------------------------------------------------------------------------------

namespace {

// One token's heads: o = X(X(x * c) + X(rot * s)) with rot = (-x2, x1) for x = (x1, x2) halves of D. The
// negation is exact, so X(-x2 * s1) = -X(x2 * s1).
template <class X>
void rotary_row(const X* x, int64_t head_stride, int64_t nh, const X* c, const X* s, X* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < nh; ++h) {
    const X* xh = x + h * head_stride;
    X* oh = out + h * d;
    int64_t k = 0;
    for (; k + W <= half; k += W) {
      const vf x1 = load(xh + k), x2 = load(xh + half + k);
      store(oh + k, round_to<X>(x1 * load(c + k)) - round_to<X>(x2 * load(s + k)));
      store(oh + half + k, round_to<X>(x2 * load(c + half + k)) + round_to<X>(x1 * load(s + half + k)));
    }
    for (; k < half; ++k) {
      const float x1 = to_float(xh[k]), x2 = to_float(xh[half + k]);
      oh[k] = from_float<X>(round_to<X>(x1 * to_float(c[k])) - round_to<X>(x2 * to_float(s[k])));
      oh[half + k] =
          from_float<X>(round_to<X>(x2 * to_float(c[half + k])) + round_to<X>(x1 * to_float(s[half + k])));
    }
  }
}

// cos or sin [T, 1, D] / [T, D] with contiguous rows, D = d, in x's dtype; returns its row stride.
int64_t check_table(const at::Tensor& t, const char* name, const at::Tensor& x) {
  const bool shape = (t.dim() == 3 && t.size(1) == 1) || t.dim() == 2;
  TORCH_CHECK_VALUE(shape && t.size(0) == x.size(0) && t.size(-1) == x.size(2) && t.stride(-1) == 1 &&
                        t.dtype() == x.dtype(),
                    name, ": need [T = ", x.size(0), ", 1, D = ", x.size(2), "] (or [T, D]) ", x.dtype(),
                    " with contiguous rows, got ", t.sizes(), " ", t.dtype(), " strides ", t.strides());
  return t.stride(0);
}

}  // namespace

// out = x * cos + rotate_half(x) * sin over x [T, nh, D] (any row and head strides), out contiguous.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0 &&
                        is_model_dtype(x.scalar_type()),
                    "x: need [T, heads, D] float32, bfloat16 or float16 on the CPU, D even and contiguous, got ",
                    x.sizes(), " ", x.dtype(), " strides ", x.strides());
  const int64_t cs = check_table(cos, "cos", x), ss = check_table(sin, "sin", x);
  const int64_t nh = x.size(1), d = x.size(2), xs = x.stride(0), hs = x.stride(1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    const X* xp = x.data_ptr<X>();
    const X* cp = cos.data_ptr<X>();
    const X* sp = sin.data_ptr<X>();
    X* op = out.data_ptr<X>();
    at::parallel_for(0, x.size(0), grain(nh * d), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        rotary_row<X>(xp + t * xs, hs, nh, cp + t * cs, sp + t * ss, op + t * nh * d, d);
    });
  });
  return out;
}

// cos, sin [T, 1, D] in dtype: X(cos(float(positions[t]) * inv_freq[j]) * scaling) at j and j + D / 2.
std::tuple<at::Tensor, at::Tensor> rotary_cos_sin(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                  double scaling, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(positions.device().is_cpu() && positions.dim() == 1 && positions.dtype() == at::kLong &&
                        positions.is_contiguous(),
                    "positions: need [T] int64 contiguous on the CPU, got ", positions.sizes(), " ",
                    positions.dtype());
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.dtype() == at::kFloat && inv_freq.is_contiguous(),
                    "inv_freq: need [D / 2] float32 contiguous, got ", inv_freq.sizes(), " ", inv_freq.dtype());
  TORCH_CHECK_VALUE(is_model_dtype(dtype), "dtype: need float32, bfloat16 or float16, got ", dtype);
  const int64_t n = positions.size(0), half = inv_freq.size(0), d = 2 * half;
  if (n * half >= TORCH_SINCOS_ELEMS) {  // a long prompt's table: torch's own ops, the reference's
    at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
    at::Tensor emb = at::cat({freqs, freqs}, -1);
    return {(emb.cos() * scaling).to(dtype).unsqueeze(1), (emb.sin() * scaling).to(dtype).unsqueeze(1)};
  }
  auto options = positions.options().dtype(dtype);
  at::Tensor cos = at::empty({n, 1, d}, options), sin = at::empty({n, 1, d}, options);
  const float scale = static_cast<float>(scaling);
  dispatch(dtype, [&](auto tag) {
    using X = decltype(tag);
    const int64_t* pp = positions.data_ptr<int64_t>();
    const float* fp = inv_freq.data_ptr<float>();
    X* cp = cos.data_ptr<X>();
    X* sp = sin.data_ptr<X>();
    at::parallel_for(0, n, grain(d, 8), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const float p = static_cast<float>(pp[t]);
        for (int64_t j = 0; j < half; ++j) {
          float sf, cf;
          sincosf(p * fp[j], &sf, &cf);  // glibc's sinf and cosf in one (the same polynomials)
          const X c = from_float<X>(cf * scale), s = from_float<X>(sf * scale);
          cp[t * d + j] = cp[t * d + half + j] = c;
          sp[t * d + j] = sp[t * d + half + j] = s;
        }
      }
    });
  });
  return {cos, sin};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own ops run: the server's other Python threads go on meanwhile.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, "w * X(rms_norm(float(x))) (fused_cpu.cpp)", nogil);
  m.def("add_rms_norm_", &add_rms_norm_, "residual = x + residual; x = rms_norm(residual), in place", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up from gate_up [T, 2 I] (fused_cpu.cpp)", nogil);
  m.def("rotary", &rotary, "x * cos + rotate_half(x) * sin (fused_cpu.cpp)", nogil);
  m.def("rotary_cos_sin", &rotary_cos_sin, "cos, sin [T, 1, D] of positions (fused_cpu.cpp)", nogil);
}
