// CPU float32 linear y[M, N] = x[M, K] @ W[N, K].T (+ b): the columns of y are split over the kernels' thread team
// (threads_cpu.h), each chunk one at::mm / at::addmm, which runs serially on a team thread (MKL's sgemv / sgemm).
// Built with the other CPU kernels by kernels/cpu_ext.py; called from kernels/linear_cpu.py.
// Why: the engine thread runs torch's own ops serially (threads_cpu.cpp says why), so a float model's products
// get their threads here. W may be the usual [N, K] or a transposed view of a [K, N] tensor (linears.py's
// cpu_matvec_layout): each chunk is a view of it either way. Each element of y is one chunk's product of a row of x
// and a row of W, so the result does not depend on the thread count.
#include <torch/extension.h>

#include "threads_cpu.h"

namespace mistralrs_cpu {

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && w.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_cpu() && w.size(1) == x.size(1),
              "linear_cpu: x must be CPU float32 [M, K] and weight CPU float32 [N, K]");
  const int64_t M = x.size(0), N = w.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat),
              "linear_cpu: bias must be float32 [", N, "]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (y.numel() == 0) return y;
  // Columns per chunk: enough that MKL's per-call cost (~1 us) stays small against the chunk's K x cols weights.
  const int64_t grain = std::max<int64_t>(16, (1 << 14) / std::max<int64_t>(x.size(1), 1));
  parallel_for_torch(N, grain, [&](int64_t n0, int64_t n1) {
    const at::Tensor wt = w.narrow(0, n0, n1 - n0).t();  // [K, cols]
    y.narrow(1, n0, n1 - n0).copy_(bias ? at::addmm(bias->narrow(0, n0, n1 - n0), x, wt) : at::mm(x, wt));
  });
  return y;
}

}  // namespace mistralrs_cpu
