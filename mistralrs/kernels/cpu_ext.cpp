// The Python bindings of the CPU kernels (one extension, built by kernels/cpu_ext.py); each is defined in its
// family's file: threads_cpu.cpp, gguf_cpu.cpp, linear_cpu.cpp, decoder_cpu.cpp, attention_cpu.cpp, rowwise_cpu.cpp.
#include <torch/extension.h>

#include "threads_cpu.h"

namespace mistralrs_cpu {
at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t N, int64_t K,
                       int64_t gemm_tile);
at::Tensor gguf_rows(const at::Tensor& w, int64_t qtype, int64_t K, const at::Tensor& ids);
bool cpu_has_avx2();
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const c10::optional<at::Tensor>& cu_seqlens_q, double scale, int64_t window,
                           double softcap);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool unit_offset);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void bind_decoder(py::module& m);
}  // namespace mistralrs_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mistralrs_cpu;
  m.def("gguf_matmul", &gguf_matmul, "y[M, N] = x[M, K] @ W.T, W as GGUF blocks; gemm_tile = 0 for gemv");
  m.def("gguf_rows", &gguf_rows, "rows ids of W [N, K] (GGUF blocks) as float32 [T, K]: an embedding lookup");
  m.def("cpu_has_avx2", &cpu_has_avx2);
  m.def("linear", &linear, "y[M, N] = x[M, K] @ W[N, K].T (+ b), float32, columns split over the team");
  m.def("set_threads", &set_threads, "threads of the kernels' team for calls from this thread; <= 0: its torch count");
  m.def("threads", &threads, "threads of the kernels' team, as the calling thread would use it");
  m.def("torch_ops_serial", &torch_ops_serial, "torch's own ops on the calling thread run on it alone");
  m.def("store_kv", &store_kv, "k_cache/v_cache[slots] = k, v (float32)");
  m.def("paged_attention", &paged_attention,
        "ragged queries (cu_seqlens_q; None: one per sequence) against their paged context, causal; window <= 0: "
        "none, softcap <= 0: none");
  m.def("rms_norm", &rms_norm, "x / rms(x) * (w or 1 + w), per row (float32)");
  bind_decoder(m);  // Proj, DecoderLayer
  m.def("rotary_", &rotary_, "rotate-half rotary on the first cos.size(1) dims of each head, in place (float32)");
}
