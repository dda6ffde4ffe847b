// CPU decode attention over the paged KV cache, and the KV write, for float32 caches (AVX2, FMA).
// Built with the other CPU kernels by kernels/cpu_ext.py; called from kernels/attention_cpu.py, which keeps the
// torch paths (SDPA) for prefill and for other dtypes. Layouts as kernels/reference.py:
//   k_cache, v_cache [NB, BS, KVH, D] contiguous; token i of a sequence sits in slot table[i / BS] * BS + i % BS.
// Why here and not SDPA: a decode step's attention on a short context is microseconds of arithmetic, but SDPA's
// dispatch, the per-sequence gather of pages and the Python around it cost ~60 us a layer (SmolLM2's 30 layers: ~2 ms
// of a 20 ms token). This reads the pages in place, all sequences and KV heads in one parallel loop.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include "simd_cpu.h"
#include "threads_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace mistralrs_cpu {
namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < D; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float p, const float* x, float* y, int64_t D) {  // y += p * x
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < D; ++i) y[i] += p * x[i];
}

// A token's K (or V) row of one head is D floats out of every KVH * D: a strided walk through a cache that the
// weights streamed through since the last step have evicted. Without prefetching, each row costs a DRAM latency
// (measured on SmolLM2, 3 KV heads, ~100-token contexts: 65 us a layer in the model against 14 us with a warm
// cache); with the rows kAhead tokens ahead requested early, the walk overlaps them.
constexpr int64_t kAhead = 8;

inline void prefetch(const float* p, int64_t D) {
  for (int64_t i = 0; i < D; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

void check_cache(const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4 && c.scalar_type() == at::kFloat && c.is_contiguous() && c.is_cpu(), "attention_cpu: ",
              name, " must be a contiguous CPU float32 [NB, BS, KVH, D] tensor");
}

}  // namespace

// k_cache/v_cache slots[t] <- k[t], v[t] ([T, KVH, D], any strides with a contiguous last dim).
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots) {
  RECORD_FUNCTION("mistralrs::store_kv", {});
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  const int64_t T = k.size(0), KVH = k_cache.size(2), D = k_cache.size(3), S = k_cache.size(0) * k_cache.size(1);
  for (const at::Tensor* x : {&k, &v})
    TORCH_CHECK(x->dim() == 3 && x->size(0) == T && x->size(1) == KVH && x->size(2) == D && x->stride(2) == 1 &&
                    x->scalar_type() == at::kFloat,
                "attention_cpu.store_kv: k and v must be float32 [T, ", KVH, ", ", D, "] with a contiguous last dim");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "attention_cpu.store_kv: slot_mapping must be a contiguous int64 [T] tensor");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "attention_cpu.store_kv: slot ", sp[t], " outside the cache's ", S, " slots");
  auto copy = [&](const at::Tensor& x, at::Tensor& cache) {
    const float* xp = x.data_ptr<float>();
    float* cp = cache.data_ptr<float>();
    parallel_for(T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t h = 0; h < KVH; ++h)
          std::memcpy(cp + (sp[t] * KVH + h) * D, xp + t * x.stride(0) + h * x.stride(1), D * sizeof(float));
    });
  };
  copy(k, k_cache);
  copy(v, v_cache);
}

// One query per sequence, q [B, H, D] (contiguous last dim): out[b, h] = softmax(s) . V over the sequence's last
// min(n, window) cached tokens, s_j = scale * q . k_j, capped as softcap * tanh(s / softcap) when softcap > 0.
// The G = H / KVH query heads of a KV head run together, so each K/V row is read once per group.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap) {
  RECORD_FUNCTION("mistralrs::paged_decode_attention", {});
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  const int64_t B = q.size(0), H = q.size(1), BS = k_cache.size(1), KVH = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D && q.stride(2) == 1 && q.scalar_type() == at::kFloat && H % KVH == 0,
              "attention_cpu: q must be float32 [B, H, ", D, "] (H a multiple of ", KVH, ") with a contiguous last dim");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && context_lens.dim() == 1 && context_lens.size(0) == B &&
                  context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "attention_cpu: block_tables must be int32 [B, W] and context_lens int32 [B], contiguous");
  const int64_t W = block_tables.size(1), NB = k_cache.size(0), G = H / KVH;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= W * BS, "attention_cpu: context_lens[", b, "] = ", lens[b],
                " outside [1, ", W * BS, "]");
    for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(tables[b * W + i] >= 0 && tables[b * W + i] < NB, "attention_cpu: block ", tables[b * W + i],
                  " of sequence ", b, " outside the cache's ", NB, " blocks");
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale), cap = float(softcap);
  parallel_for(B * KVH, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> s;  // [G, L] scores, then probabilities
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / KVH, kvh = task % KVH, n = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, L = n - first;
      s.resize(G * L);
      auto row = [&](const float* cache, int64_t j) {  // K or V of token j of sequence b, head kvh
        return cache + ((int64_t(tables[b * W + j / BS]) * BS + j % BS) * KVH + kvh) * D;
      };
      const float* qb = qp + b * q.stride(0) + kvh * G * q.stride(1);
      for (int64_t j = 0; j < L; ++j) {
        if (j + kAhead < L) prefetch(row(kp, first + j + kAhead), D);
        const float* kj = row(kp, first + j);
        for (int64_t g = 0; g < G; ++g) {
          const float x = sc * dot(qb + g * q.stride(1), kj, D);
          s[g * L + j] = cap > 0.f ? float(cap * std::tanh(double(x) / cap)) : x;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax in double: its sum over thousands of keys stays exact
        float* sg = s.data() + g * L;
        const double mx = *std::max_element(sg, sg + L);
        double sum = 0.0;
        for (int64_t j = 0; j < L; ++j) sum += std::exp(double(sg[j]) - mx);
        for (int64_t j = 0; j < L; ++j) sg[j] = float(std::exp(double(sg[j]) - mx) / sum);
      }
      float* ob = op + (b * H + kvh * G) * D;
      std::memset(ob, 0, G * D * sizeof(float));
      for (int64_t j = 0; j < L; ++j) {
        if (j + kAhead < L) prefetch(row(vp, first + j + kAhead), D);
        const float* vj = row(vp, first + j);
        for (int64_t g = 0; g < G; ++g) axpy(s[g * L + j], vj, ob + g * D, D);
      }
    }
  });
  return out;
}

// Prefill attention of one sequence, q [1, H, L, D], k, v [1, KVH, N, D] (views), as torch's fused SDPA (GQA, a
// causal flag or a bool mask [L, N]) one query head at a time on the team's threads: the engine thread runs torch's
// ops serially (threads_cpu.cpp says why), and this is the one large torch op of a prefill. Each head's result is
// SDPA's for that head alone.
at::Tensor sdpa_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& mask, bool causal, double scale) {
  RECORD_FUNCTION("mistralrs::sdpa_heads", {});
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == 1 && k.size(1) == v.size(1) &&
                  q.size(1) % k.size(1) == 0,
              "attention_cpu.sdpa_heads: q [1, H, L, D], k and v [1, KVH, N, D] with H a multiple of KVH");
  const int64_t H = q.size(1), G = H / k.size(1);
  at::Tensor out = at::empty({1, H, q.size(2), v.size(3)}, q.options());
  parallel_for_torch(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const at::Tensor o = at::scaled_dot_product_attention(
          q.narrow(1, h, 1), k.narrow(1, h / G, 1), v.narrow(1, h / G, 1), mask, 0.0, causal, scale);
      out.narrow(1, h, 1).copy_(o);
    }
  });
  return out;
}

}  // namespace mistralrs_cpu
