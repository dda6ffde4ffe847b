// CPU float32 linear y[M, N] = x[M, K] @ W[N, K].T (+ b), batch invariant: y[m, n] has the same bits whatever M,
// the other rows of x and the thread count. Built with the other CPU kernels by kernels/cpu_ext.py; called from
// kernels/linear_cpu.py and decoder_cpu.cpp.
//
// Why: with one arithmetic for decode (an AVX2 gemv) and another for prefill (MKL's sgemm), a token's logits
// differed in the last bits between decoding alone, in a batch and in a prefill, so greedy generation changed with
// the batch and with the prefix cache. Now every y[m, n] is computed in one order (`finish` below says which): lane
// l of one 8-lane accumulator sums x[m, k] * w[n, k] over k = l (mod 8), k ascending, one FMA each; hsum
// (simd_cpu.h) adds the lanes; the K % 8 tail follows in order; then the bias. Only the tile that holds the
// accumulator changes with M: tiles of R rows of x by C rows of W (R x C accumulators; each vector loaded is used
// C or R times), the rows of W split over the kernels' thread team (threads_cpu.h), x taken in slabs that stay in
// L2 while a thread's rows of W go by (as gguf_cpu.cpp's int8 path does). A CPU with AVX-512VL gets tiles twice as
// large in its 32 ymm registers: the same 256-bit instructions, so the same bits (tests/test_linear.py checks).
// Another layout of W or x (a transposed view) is copied to rows first, then the same kernel: the same bits too.
//
// Measured on SmolLM2-135M shapes (MEASUREMENTS TBD).
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "simd_cpu.h"
#include "threads_cpu.h"

namespace mistralrs_cpu {
namespace {

// Everything under the panel_* entry points is inlined into them, so that it is compiled for their target (the
// AVX-512VL ones get 32 registers). For the same reason there are no lambdas on this path.
#define LINEAR_INLINE inline __attribute__((always_inline))

// y[m, n] from its accumulator: the lanes in hsum's fixed tree, then the tail k = K8 .. K - 1 in order (one FMA
// each), then the bias.
LINEAR_INLINE float finish(__m256 acc, const float* x, const float* w, int64_t K8, int64_t K, const float* bias) {
  float s = hsum(acc);
  for (int64_t k = K8; k < K; ++k) s = std::fma(x[k], w[k], s);
  return bias ? s + *bias : s;
}

// y[r, c] = x[r] . w[c] for R rows of x (stride sx) and C rows of W (stride sw): acc[r][c] lane l takes
// x[r, k] * w[c, k] for k = l, l + 8, ... below K8 = K - K % 8. y has stride sy; bias (or null) is the C tile's.
template <int R, int C>
LINEAR_INLINE void tile(const float* x, int64_t sx, const float* w, int64_t sw, int64_t K, float* y, int64_t sy,
                        const float* bias) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * sw + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * sx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      y[r * sy + c] = finish(acc[r][c], x + r * sx, w + c * sw, K8, K, bias ? bias + c : nullptr);
}

struct Args {
  const float *x, *w, *bias;
  float* y;
  int64_t M, N, K, sx, sw;  // y is [M, N], contiguous
};

// Rows [m0, m1) of x against C rows of W from row n: tiles of R rows of x, then of 2 and 1 for the rows left.
// Returns C.
template <int R, int C>
LINEAR_INLINE int64_t rows_of_w(const Args& a, int64_t m0, int64_t m1, int64_t n) {
  const float* w = a.w + n * a.sw;
  const float* b = a.bias ? a.bias + n : nullptr;
  int64_t m = m0;
  for (; m + R <= m1; m += R) tile<R, C>(a.x + m * a.sx, a.sx, w, a.sw, a.K, a.y + m * a.N + n, a.N, b);
  if (R > 2 && m + 2 <= m1) tile<2, C>(a.x + m * a.sx, a.sx, w, a.sw, a.K, a.y + m * a.N + n, a.N, b), m += 2;
  if (m < m1) tile<1, C>(a.x + m * a.sx, a.sx, w, a.sw, a.K, a.y + m * a.N + n, a.N, b);
  return C;
}

// x is taken this much at a time: it stays in L2 (Zen 2: 512 KB, Zen 4: 1 MB) while a thread's rows of W go by.
constexpr int64_t kSlabBytes = 256 << 10;

// Rows [n0, n1) of W, C at a time (where fewer are left, 4, 2, 1), against every row of x, a slab at a time.
// No software prefetch: the C rows of W a tile streams at once keep the hardware prefetchers busy, and prefetching
// the next tile's rows made decode slower (M = 1, SmolLM2 shapes, 1 thread: about 0.8x, into L1 or L2 alike).
template <int R, int C>
LINEAR_INLINE void panel(const Args& a, int64_t n0, int64_t n1) {
  const int64_t slab = std::max<int64_t>(R, kSlabBytes / std::max<int64_t>(a.K * 4, 1) / R * R);
  for (int64_t m0 = 0; m0 < a.M; m0 += slab) {
    const int64_t m1 = std::min(a.M, m0 + slab);
    for (int64_t n = n0; n < n1;) {
      if (n + C <= n1) n += rows_of_w<R, C>(a, m0, m1, n);
      else if (C > 4 && n + 4 <= n1) n += rows_of_w<R, 4>(a, m0, m1, n);
      else if (n + 2 <= n1) n += rows_of_w<R, 2>(a, m0, m1, n);
      else n += rows_of_w<R, 1>(a, m0, m1, n);
    }
  }
}

// The tilings. AVX2 has 16 ymm registers: 4 x 3 accumulators + 3 rows of W + 1 of x. AVX-512VL has 32: 4 x 6. Few
// rows of x (decode, small batches: memory-bound) get tiles of more rows of W: more of W streamed at once, more
// independent FMA chains: 2 x 8 (AVX-512VL), 2 x 6 (AVX2: 12 accumulators + 2 rows of x + one vector of W at a
// time). (Measured at 1 thread, M = 4 and 8: 2 x 8 1.1-1.2x faster than 4 x 6; M = 32: 0.8x.)
constexpr int64_t kFewRows = 8;

using PanelFn = void (*)(const Args&, int64_t, int64_t);
void panel_4x3(const Args& a, int64_t n0, int64_t n1) { panel<4, 3>(a, n0, n1); }
void panel_2x6(const Args& a, int64_t n0, int64_t n1) { panel<2, 6>(a, n0, n1); }
__attribute__((target("avx512f,avx512vl"))) void panel_4x6(const Args& a, int64_t n0, int64_t n1) {
  panel<4, 6>(a, n0, n1);
}
__attribute__((target("avx512f,avx512vl"))) void panel_2x8(const Args& a, int64_t n0, int64_t n1) {
  panel<2, 8>(a, n0, n1);
}

struct Tiling {
  int64_t cols;  // C: rows of W per tile
  PanelFn panel;
};

// MISTRALRS_LINEAR_AVX2=1 keeps the AVX2 tilings where AVX-512VL is present (the tests compare the two).
bool wide_registers() {
  const char* env = std::getenv("MISTRALRS_LINEAR_AVX2");
  return !(env && std::atoi(env) == 1) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

Tiling tiling(int64_t M) {
  static const bool wide = wide_registers();
  if (M <= kFewRows) return wide ? Tiling{8, panel_2x8} : Tiling{6, panel_2x6};
  return wide ? Tiling{6, panel_4x6} : Tiling{3, panel_4x3};
}

// Tiles of rows of W spread over the team, at least 16 rows of W a task (a task should outlast its dispatch).
void run(const Args& a) {
  const Tiling t = tiling(a.M);
  parallel_for((a.N + t.cols - 1) / t.cols, std::max<int64_t>(1, 16 / t.cols), [&](int64_t t0, int64_t t1) {
    t.panel(a, t0 * t.cols, std::min(a.N, t1 * t.cols));
  });
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && w.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_cpu() && w.size(1) == x.size(1),
              "linear_cpu: x must be CPU float32 [M, K] and weight CPU float32 [N, K]");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                        bias->is_cpu()),
              "linear_cpu: bias must be CPU float32 [", N, "]");
  RECORD_FUNCTION("mistralrs::linear", {});
  at::Tensor y = at::empty({M, N}, x.options());
  if (y.numel() == 0) return y;
  // Rows of W and x must be contiguous; another layout (a transposed view) is copied to rows: the same bits.
  const at::Tensor xr = x.stride(1) == 1 ? x : x.contiguous(), wr = w.stride(1) == 1 ? w : w.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  run(Args{xr.data_ptr<float>(), wr.data_ptr<float>(), bias ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
           M, N, K, xr.stride(0), wr.stride(0)});
  return y;
}

}  // namespace mistralrs_cpu
