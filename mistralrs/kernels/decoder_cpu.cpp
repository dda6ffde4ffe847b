// One decoder layer of a CPU decode step in one call: layers.py's PreNormBlock / Gemma's SandwichBlock over an
// Attention and a GatedMLP, written as the same ops in C++ (the kernels of gguf_cpu.cpp, linear_cpu.cpp,
// rowwise_cpu.cpp and attention_cpu.cpp, and the aten ops the Python path calls), so the result is the Python
// path's bit for bit. Built with the other CPU kernels by kernels/cpu_ext.py; assembled from a block by
// kernels/decoder_cpu.py.
//
// Why: a decode token of a small model is ~15 kernel calls per layer, each a few microseconds of Python around
// microseconds of work. Measured on SmolLM2-135M Q4_1 (30 layers), 2-core EPYC: 14.1 ms per token at 1 thread and
// 10.3 ms at 2, i.e. ~6 ms of it did not get faster with a second thread. Here a layer costs one call from Python;
// the kernels inside still split their work over the thread team (threads_cpu.h).
#include <torch/extension.h>
#include <ATen/record_function.h>

namespace mistralrs_cpu {

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t N, int64_t K,
                       int64_t gemm_tile);
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool unit_offset);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const c10::optional<at::Tensor>& cu_seqlens_q, double scale, int64_t window,
                           double softcap);

// A projection: GGUF blocks (qtype >= 0, w uint8 [N, row_bytes]) or float32 (qtype < 0, w [N, K]), bias optional.
struct Proj {
  at::Tensor w;
  int64_t qtype, N, K;
  c10::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x) const {  // x [B, K] contiguous; gguf_cpu.py's default (int8) path
    if (qtype < 0) return mistralrs_cpu::linear(x, w, bias);
    at::Tensor y = gguf_matmul(x, w, qtype, N, K, 0);
    return bias ? y + *bias : y;
  }
};

enum Act : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

struct DecoderLayer {
  std::vector<Proj> qkv;      // one fused projection, or q, k, v
  Proj o;
  std::vector<Proj> gate_up;  // one fused projection, or gate, up
  Proj down;
  // post_attn / post_ffn: Gemma 2 and 3's norms after attention and the MLP; q_norm / k_norm: Gemma 3's per head.
  at::Tensor in_norm, post_attn_norm, pre_ffn_norm, post_ffn_norm, q_norm, k_norm;  // undefined where absent
  double eps;
  bool unit_offset;
  int64_t H, KVH, D;
  double scale;
  int64_t window;   // <= 0: none
  double softcap;   // <= 0: none
  int64_t act;

  // x [B, C] -> x after the layer; cos, sin [B, 1, r] (layers.Rotary's tables); the cache and metadata as
  // attention_cpu.cpp takes them.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& tables,
                     const at::Tensor& lens) const {
    RECORD_FUNCTION("mistralrs::decoder_layer", {});
    const int64_t B = x.size(0);
    const at::Tensor h = rms_norm(x, in_norm, eps, unit_offset);
    at::Tensor q, k, v;
    if (qkv.size() == 1) {
      const auto parts = qkv[0](h).split_with_sizes({H * D, KVH * D, KVH * D}, -1);
      q = parts[0], k = parts[1], v = parts[2];
    } else {
      q = qkv[0](h), k = qkv[1](h), v = qkv[2](h);
    }
    q = q.view({B, H, D}), k = k.view({B, KVH, D}), v = v.view({B, KVH, D});
    if (q_norm.defined()) {
      q = rms_norm(q.reshape({-1, D}), q_norm, eps, unit_offset).view({B, H, D});
      k = rms_norm(k.reshape({-1, D}), k_norm, eps, unit_offset).view({B, KVH, D});
    }
    const at::Tensor c = cos.select(1, 0), s = sin.select(1, 0);  // [B, r]
    rotary_(q, c, s);
    rotary_(k, c, s);
    store_kv(k, v, k_cache, v_cache, slots);
    const at::Tensor attn = paged_attention(q, k_cache, v_cache, tables, lens, c10::nullopt, scale, window, softcap);
    at::Tensor a = o(attn.reshape({B, H * D}));
    if (post_attn_norm.defined()) a = rms_norm(a, post_attn_norm, eps, unit_offset);
    const at::Tensor hx = x + a;
    const at::Tensor f = rms_norm(hx, pre_ffn_norm, eps, unit_offset);
    at::Tensor gate, up;
    if (gate_up.size() == 1) {
      const auto parts = gate_up[0](f).split_with_sizes({gate_up[0].N / 2, gate_up[0].N / 2}, -1);
      gate = parts[0], up = parts[1];
    } else {
      gate = gate_up[0](f), up = gate_up[1](f);
    }
    const at::Tensor g = act == kSilu ? at::silu(gate) : at::gelu(gate, act == kGeluTanh ? "tanh" : "none");
    at::Tensor d = down(g * up);
    if (post_ffn_norm.defined()) d = rms_norm(d, post_ffn_norm, eps, unit_offset);
    return hx + d;
  }
};

void bind_decoder(py::module& m) {
  py::class_<Proj>(m, "Proj")
      .def(py::init([](at::Tensor w, int64_t qtype, int64_t N, int64_t K, c10::optional<at::Tensor> bias) {
             return Proj{std::move(w), qtype, N, K, std::move(bias)};
           }),
           py::arg("w"), py::arg("qtype"), py::arg("N"), py::arg("K"), py::arg("bias") = py::none());
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init([](std::vector<Proj> qkv, Proj o, std::vector<Proj> gate_up, Proj down, at::Tensor in_norm,
                       c10::optional<at::Tensor> post_attn_norm, at::Tensor pre_ffn_norm,
                       c10::optional<at::Tensor> post_ffn_norm, c10::optional<at::Tensor> q_norm,
                       c10::optional<at::Tensor> k_norm, double eps, bool unit_offset, int64_t H, int64_t KVH,
                       int64_t D, double scale, int64_t window, double softcap, int64_t act) {
             TORCH_CHECK((qkv.size() == 1 || qkv.size() == 3) && (gate_up.size() == 1 || gate_up.size() == 2) &&
                             act >= kSilu && act <= kGelu && q_norm.has_value() == k_norm.has_value(),
                         "DecoderLayer: qkv takes 1 or 3 projections, gate_up 1 or 2, act 0..2, q_norm with k_norm");
             return DecoderLayer{std::move(qkv), std::move(o), std::move(gate_up), std::move(down), in_norm,
                                 post_attn_norm.value_or(at::Tensor()), pre_ffn_norm,
                                 post_ffn_norm.value_or(at::Tensor()), q_norm.value_or(at::Tensor()),
                                 k_norm.value_or(at::Tensor()), eps, unit_offset, H, KVH, D, scale, window,
                                 softcap, act};
           }),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("in_norm"),
           py::arg("post_attn_norm"), py::arg("pre_ffn_norm"), py::arg("post_ffn_norm"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("eps"), py::arg("unit_offset"), py::arg("H"), py::arg("KVH"), py::arg("D"),
           py::arg("scale"), py::arg("window"), py::arg("softcap"), py::arg("act"))
      .def("forward", &DecoderLayer::forward);
}

}  // namespace mistralrs_cpu
