// CPU paged attention and the KV write, for float32 caches (AVX2, FMA). Built with the other CPU kernels by
// kernels/cpu_ext.py; called from kernels/attention_cpu.py (and decoder_cpu.cpp), which keeps torch's SDPA for
// other dtypes. Layouts as kernels/reference.py:
//   k_cache, v_cache [NB, BS, KVH, D] contiguous; token i of a sequence sits in slot table[i / BS] * BS + i % BS.
// One kernel for prefill, chunked prefill, prefix-cache hits and decode: a query's result depends only on its own
// keys, never on how many queries share the call or how its context was computed, so greedy output does not change
// with the batch or the cache (README, "Batch invariance").
// Why not SDPA for prefill: its result for a query depends on the query block it falls in; and for decode, a short
// context's attention is microseconds of arithmetic, while SDPA's dispatch, the per-sequence gather of pages and the
// Python around it cost ~60 us a layer (SmolLM2's 30 layers: ~2 ms of a 20 ms token). This reads the pages in place,
// all sequences, KV heads and query chunks in one parallel loop.
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

inline void scale_row(float a, float* y, int64_t D) {  // y *= a
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(av, _mm256_loadu_ps(y + i)));
  for (; i < D; ++i) y[i] *= a;
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

// e^x for x <= 0, 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-5 polynomial, 2^n in the
// exponent bits; relative error ~1e-7). Far faster than std::exp per key, and the same bits on every call.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));  // e^-87.3 ~ 1e-38: the smallest normal float's neighbourhood
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));  // ln 2 in two parts: r exact
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// s[j] <- e^(s[j] - max s) for j < L (s padded to a multiple of 8); returns sum_j s[j] (8 lanes, then hsum).
inline float exp_shifted(float* s, int64_t L) {
  const float mx = *std::max_element(s, s + L);
  const int64_t L8 = L & ~int64_t(7);
  for (int64_t j = L8; j < ((L + 7) & ~int64_t(7)); ++j) s[j] = j < L ? s[j] : -INFINITY;  // e^-inf -> ~0, cut below
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; j += 8) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mx)));
    if (j == L8) {  // the tail's padding lanes: exactly 0
      alignas(32) float keep[8];
      for (int l = 0; l < 8; ++l) keep[l] = j + l < L ? 1.f : 0.f;
      e = _mm256_mul_ps(e, _mm256_load_ps(keep));
    }
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum(sum);
}

constexpr int64_t kQueryChunk = 16;  // queries of one sequence and KV head per task (a prefill's parallel grain)

struct Cache {  // the paged K and V caches with one batch's block tables
  const float *k, *v;
  const int32_t* tables;
  int64_t W, BS, KVH, D;
  const float* row(const float* c, int64_t b, int64_t kvh, int64_t j) const {  // token j of sequence b, head kvh
    return c + ((int64_t(tables[b * W + j / BS]) * BS + j % BS) * KVH + kvh) * D;
  }
};

// The G query heads of KV head kvh for one query of sequence b (q_g at q + g * q_stride) against keys
// [first, last): out[g] (D floats each) = softmax(s) . V. The G heads run together so that each K/V row is read
// once per group; s is scratch.
void attend_query(const Cache& c, int64_t b, int64_t kvh, int64_t first, int64_t last, const float* q,
                  int64_t q_stride, int64_t G, float sc, float cap, std::vector<float>& s, float* out) {
  const int64_t L = last - first, Lp = (L + 7) & ~int64_t(7), D = c.D;
  s.resize(G * Lp + G);
  float* inv = s.data() + G * Lp;  // 1 / sum_j e_j of each head
  for (int64_t j = 0; j < L; ++j) {
    if (j + kAhead < L) prefetch(c.row(c.k, b, kvh, first + j + kAhead), D);
    const float* kj = c.row(c.k, b, kvh, first + j);
    for (int64_t g = 0; g < G; ++g) {
      const float x = sc * dot(q + g * q_stride, kj, D);
      s[g * Lp + j] = cap > 0.f ? float(cap * std::tanh(double(x) / cap)) : x;
    }
  }
  for (int64_t g = 0; g < G; ++g) inv[g] = 1.f / exp_shifted(s.data() + g * Lp, L);
  std::memset(out, 0, G * D * sizeof(float));
  for (int64_t j = 0; j < L; ++j) {
    if (j + kAhead < L) prefetch(c.row(c.v, b, kvh, first + j + kAhead), D);
    const float* vj = c.row(c.v, b, kvh, first + j);
    for (int64_t g = 0; g < G; ++g) axpy(s[g * Lp + j], vj, out + g * D, D);
  }
  for (int64_t g = 0; g < G; ++g) scale_row(inv[g], out + g * D, D);
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

// Causal attention of a ragged batch of queries q [T, H, D] (contiguous last dim) against each sequence's paged
// context. Sequence b owns queries cu[b] .. cu[b + 1] - 1 (cu_seqlens_q [B + 1]; none: one query per sequence, a
// decode step); with n = context_lens[b] tokens cached (the new ones included) and L queries, query i sits at
// position p = n - L + i and sees keys max(0, p + 1 - window) .. p:
//     out = sum_j e_j v_j / sum_j e_j,   e_j = exp(s_j - max s),   s_j = scale * q . k_j
// (capped as softcap * tanh(s / softcap) when softcap > 0). Each query's arithmetic is a function of its own keys
// alone, in the same order whether it is decoded alone, in a batch or in a prefill, after a cached prefix or in a
// chunk: `attend_query` is the only code that computes it.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const c10::optional<at::Tensor>& cu_seqlens_q, double scale, int64_t window,
                           double softcap) {
  RECORD_FUNCTION("mistralrs::paged_attention", {});
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  const int64_t T = q.size(0), H = q.size(1), BS = k_cache.size(1), KVH = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D && q.stride(2) == 1 && q.scalar_type() == at::kFloat && H % KVH == 0,
              "attention_cpu: q must be float32 [T, H, ", D, "] (H a multiple of ", KVH, ") with a contiguous last dim");
  const int64_t B = context_lens.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && context_lens.dim() == 1 && context_lens.scalar_type() == at::kInt &&
                  context_lens.is_contiguous(),
              "attention_cpu: block_tables must be int32 [B, W] and context_lens int32 [B], contiguous");
  std::vector<int64_t> cu(B + 1);
  if (cu_seqlens_q) {
    const at::Tensor& c = *cu_seqlens_q;
    TORCH_CHECK(c.dim() == 1 && c.size(0) == B + 1 && c.scalar_type() == at::kInt && c.is_contiguous(),
                "attention_cpu: cu_seqlens_q must be a contiguous int32 [B + 1] tensor");
    for (int64_t b = 0; b <= B; ++b) cu[b] = c.data_ptr<int32_t>()[b];
  } else {
    for (int64_t b = 0; b <= B; ++b) cu[b] = b;
  }
  TORCH_CHECK(cu[0] == 0 && cu[B] == T, "attention_cpu: cu_seqlens_q must run from 0 to T = ", T);
  const int64_t W = block_tables.size(1), NB = k_cache.size(0), G = H / KVH;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "attention_cpu: cu_seqlens_q must not decrease");
    TORCH_CHECK(lens[b] >= cu[b + 1] - cu[b] && lens[b] >= 1 && lens[b] <= W * BS, "attention_cpu: context_lens[",
                b, "] = ", lens[b], " outside [max(1, its ", cu[b + 1] - cu[b], " queries), ", W * BS, "]");
    for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(tables[b * W + i] >= 0 && tables[b * W + i] < NB, "attention_cpu: block ", tables[b * W + i],
                  " of sequence ", b, " outside the cache's ", NB, " blocks");
  }
  at::Tensor out = at::empty({T, H, D}, q.options());
  // Tasks: (sequence, KV head, a chunk of kQueryChunk queries), so a long prefill spreads over the team.
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (b, first query) of each chunk
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = cu[b]; i < cu[b + 1]; i += kQueryChunk) chunks.emplace_back(b, i);
  const Cache cache{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables, W, BS, KVH, D};
  const float *qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale), cap = float(softcap);
  parallel_for(int64_t(chunks.size()) * KVH, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> s;  // [G, keys] scores, then exponentials
    for (int64_t task = task0; task < task1; ++task) {
      const auto [b, i0] = chunks[task / KVH];
      const int64_t kvh = task % KVH, n = lens[b], L = cu[b + 1] - cu[b];
      for (int64_t t = i0; t < std::min(i0 + kQueryChunk, cu[b + 1]); ++t) {
        const int64_t p = n - L + (t - cu[b]), first = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
        attend_query(cache, b, kvh, first, p + 1, qp + t * q.stride(0) + kvh * G * q.stride(1), q.stride(1), G, sc,
                     cap, s, op + (t * H + kvh * G) * D);
      }
    }
  });
  return out;
}

}  // namespace mistralrs_cpu
