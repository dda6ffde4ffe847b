// CPU float32 linear y[M, N] = x[M, K] @ W[N, K].T (+ b), the rows of W split over the kernels' thread team
// (threads_cpu.h). Built with the other CPU kernels by kernels/cpu_ext.py; called from kernels/linear_cpu.py.
// Why: the engine thread runs torch's own ops serially (threads_cpu.cpp says why), so a float model's products
// get their threads here. Two paths:
//   gemv  (M < kGemvMaxRows, W rows contiguous: decode) each row of W streamed once against up to 4 rows of x,
//         AVX2 FMA dot products with the next rows prefetched. Measured on SmolLM2-135M F32 (538 MB a token),
//         2-core EPYC: 24 tok/s at 1 thread and 28 at 2 as chunks of MKL sgemv, 27 and 39 here.
//   gemm  (prefill, or W another view) chunks of columns, each one at::mm / at::addmm, which runs serially on a
//         team thread (MKL's sgemm).
// Each element of y is computed by one thread in a fixed order, so the result does not depend on the thread count.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include "simd_cpu.h"
#include "threads_cpu.h"

namespace mistralrs_cpu {
namespace {

constexpr int64_t kGemvMaxRows = 32;   // more rows: MKL's sgemm, which reuses each weight across rows
constexpr int64_t kPrefetchRows = 4;   // rows of W read ahead (gguf_cpu.cpp measured the same need)

// out[r] = x[r] . w over K for R rows of x: two accumulators a row (FMA latency), then the scalar tail.
template <int R>
void dot_rows(const float* w, const float* const* x, int64_t K, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = _mm256_setzero_ps(), a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[r] + k), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[r] + k + 8), a1[r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[r] + k), a0[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(a0[r], a1[r]));
    for (int64_t j = k; j < K; ++j) s += w[j] * x[r][j];
    out[r] = s;
  }
}

void gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), sw = w.stride(0), sx = x.stride(0);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wn = wp + n * sw;
      if (n + kPrefetchRows < n1)
        for (int64_t b = 0; b < K * 4; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wn + kPrefetchRows * sw) + b, _MM_HINT_T0);
      int64_t m = 0;
      auto tile = [&](auto rows) {
        const float* xr[rows];
        float out[rows];
        for (int r = 0; r < rows; ++r) xr[r] = xp + (m + r) * sx;
        dot_rows<rows>(wn, xr, K, out);
        for (int r = 0; r < rows; ++r) yp[(m + r) * N + n] = out[r];
        m += rows;
      };
      for (; m + 4 <= M;) tile(std::integral_constant<int, 4>());
      if (m + 2 <= M) tile(std::integral_constant<int, 2>());
      if (m < M) tile(std::integral_constant<int, 1>());
    }
  });
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && w.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_cpu() && w.size(1) == x.size(1),
              "linear_cpu: x must be CPU float32 [M, K] and weight CPU float32 [N, K]");
  const int64_t M = x.size(0), N = w.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat),
              "linear_cpu: bias must be float32 [", N, "]");
  RECORD_FUNCTION("mistralrs::linear", {});
  at::Tensor y = at::empty({M, N}, x.options());
  if (y.numel() == 0) return y;
  if (M < kGemvMaxRows && w.stride(1) == 1 && x.stride(1) == 1) {
    gemv(x, w, y);
    return bias ? y.add_(*bias) : y;
  }
  // Columns per chunk: enough that MKL's per-call cost (~1 us) stays small against the chunk's K x cols weights.
  const int64_t grain = std::max<int64_t>(16, (1 << 14) / std::max<int64_t>(x.size(1), 1));
  parallel_for_torch(N, grain, [&](int64_t n0, int64_t n1) {
    const at::Tensor wt = w.narrow(0, n0, n1 - n0).t();  // [K, cols]
    y.narrow(1, n0, n1 - n0).copy_(bias ? at::addmm(bias->narrow(0, n0, n1 - n0), x, wt) : at::mm(x, wt));
  });
  return y;
}

}  // namespace mistralrs_cpu
