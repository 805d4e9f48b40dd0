// cpu_vectors.h: the float vector type of the CPU kernels (lora_cpu, attention_cpu, fused_cpu) and its
// loads and stores from float, bfloat16 and half memory. GCC vector extensions, so one source builds for
// AVX-512 (16 lanes) and AVX2 (8 lanes) alike; intrinsics only under their ISA's macro. Every load
// widens 16-bit values in registers and every store rounds as torch does (nearest even, NaN kept
// quiet), so kernels keep no float32 copies of 16-bit tensors. worker/kernels/cpu_native.py hashes
// this header into every build key.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace cpu_vectors {

#if defined(__AVX512F__)
constexpr int W = 16;  // float lanes per vector
#else
constexpr int W = 8;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <class T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10's casts round to nearest even

inline vf broadcast(float s) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = s;
  return v;
#endif
}

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 is the top half of a float: zero-extend and shift (GCC would split the generic widening into
// 128-bit halves, hence the intrinsics where the ISA has them).
inline vf load(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)_mm512_slli_epi32(u, 16);
#elif defined(__AVX2__)
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_slli_epi32(u, 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

inline vf load(const c10::Half* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The bf16 bits of each lane, rounded to nearest even with NaN kept quiet: what c10::BFloat16(float)
// does, one lane at a time.
inline vu bf16_bits(vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vu nan = (vu)(v != v);
  return (rounded & ~nan) | (0x7fc0u & nan);
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline void store(c10::BFloat16* p, vf v) {
  vh h = __builtin_convertvector(bf16_bits(v), vh);
  std::memcpy(p, &h, sizeof h);
}

inline void store(c10::Half* p, vf v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) p[i] = static_cast<c10::Half>(v[i]);
#endif
}

}  // namespace cpu_vectors
