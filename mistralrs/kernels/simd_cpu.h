// AVX2 helpers shared by the CPU kernels (gguf_cpu.cpp, linear_cpu.cpp, attention_cpu.cpp).
#pragma once

#include <immintrin.h>

namespace mistralrs_cpu {

// The sum of v's 8 lanes: (0 + 4, 1 + 5, 2 + 6, 3 + 7), then pairs, then the last two.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace mistralrs_cpu
