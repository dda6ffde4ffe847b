// Per-token float32 ops of every layer, for CPU tensors: RMSNorm and rotary embedding (AVX2, FMA).
// Built with the other CPU kernels by kernels/cpu_ext.py; called from kernels/rowwise_cpu.py.
// Built with -ffp-contract=off (cpu_ext.py): the rotary's products and sums stay separately rounded.
// Why: on a 576-wide SmolLM2 row torch's CPU rms_norm takes ~20 us (it runs as five ops) and the rotate-half rotary
// four ops per tensor; a decode token runs 61 norms and 60 rotaries, ~3 ms of a 20 ms token. Here each is one pass.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include "threads_cpu.h"

#include <cmath>

namespace mistralrs_cpu {

// y = x / sqrt(mean(x^2) + eps) * (w, or 1 + w with unit_offset), per row of x [T, C] (rows may be strided).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool unit_offset) {
  RECORD_FUNCTION("mistralrs::rms_norm", {});
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && x.is_cpu(),
              "rowwise_cpu.rms_norm: x must be a CPU float32 [T, C] tensor with contiguous rows");
  const int64_t T = x.size(0), C = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "rowwise_cpu.rms_norm: weight must be a contiguous float32 [", C, "] tensor");
  at::Tensor y = at::empty({T, C}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(unit_offset ? 1.f : 0.f);
  parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = xp + t * x.stride(0);
      float* yr = yp + t * C;
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= C; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      float ss = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
      for (; i < C; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / float(C) + float(eps));
      const __m256 rv = _mm256_set1_ps(r);
      for (i = 0; i + 8 <= C; i += 8)
        _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rv),
                                               _mm256_add_ps(_mm256_loadu_ps(wp + i), one)));
      for (; i < C; ++i) yr[i] = xr[i] * r * (wp[i] + (unit_offset ? 1.f : 0.f));
    }
  });
  return y;
}

// In place, on the first r = cos.size(-1) dims of every head of x [T, H, D] (a strided view, contiguous last dim):
// x[:r] <- x[:r] * cos + roll(x[:r], r / 2) * sin, with sin signed for rotate-half (layers.Rotary's table: -sin on
// the first half). cos, sin [T, r], rows may be strided.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("mistralrs::rotary_embedding", {});
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.scalar_type() == at::kFloat && x.is_cpu(),
              "rowwise_cpu.rotary: x must be a CPU float32 [T, H, D] tensor with a contiguous last dim");
  const int64_t T = x.size(0), H = x.size(1), r = cos.size(1), half = r / 2;
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->dim() == 2 && c->size(0) == T && c->size(1) == r && c->stride(1) == 1 &&
                    c->scalar_type() == at::kFloat && r % 2 == 0 && r <= x.size(2),
                "rowwise_cpu.rotary: cos and sin must be float32 [T, r] (r even, <= head dim) with contiguous rows");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = cp + t * cos.stride(0), *s = sp + t * sin.stride(0);
      for (int64_t h = 0; h < H; ++h) {
        float* v = xp + t * x.stride(0) + h * x.stride(1);
        int64_t i = 0;
        // products rounded, then their sum: the reference's three ops exactly (no FMA), so the same bits
        for (; i + 8 <= half; i += 8) {
          const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
          _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                                _mm256_mul_ps(b, _mm256_loadu_ps(s + i))));
          _mm256_storeu_ps(v + half + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
        }
        for (; i < half; ++i) {
          const float a = v[i], b = v[half + i];
          const float ac = a * c[i], bs = b * s[i], bc = b * c[half + i], as = a * s[half + i];
          v[i] = ac + bs;
          v[half + i] = bc + as;
        }
      }
    }
  });
}

}  // namespace mistralrs_cpu
