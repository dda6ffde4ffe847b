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

// A token's K (or V) row of one head is D floats out of every KVH * D: a strided walk through a cache that the
// weights streamed through since the last step have evicted. Without prefetching, each row costs a DRAM latency
// (measured on SmolLM2, 3 KV heads, ~100-token contexts: 65 us a layer in the model against 14 us with a warm
// cache); with the rows kAhead tokens ahead requested early, the walk overlaps them.
constexpr int64_t kAhead = 8;

inline void prefetch(const float* p, int64_t D) {
  for (int64_t i = 0; i < D; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}


// Lanes d .. d + 7 of a row of D floats; past D, zeros (a head dim that is not a multiple of 8).
inline __m256i tail_mask(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(left, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 load_d(const float* p, int64_t d, int64_t D) {
  return d + 8 <= D ? _mm256_loadu_ps(p + d) : _mm256_maskload_ps(p + d, tail_mask(D - d));
}

// The 8 lane sums of each of v[0..8), as one vector: lane r = ((v[r]_0 + v[r]_1) + (v[r]_2 + v[r]_3)) +
// ((v[r]_4 + v[r]_5) + (v[r]_6 + v[r]_7)), the same tree for every r.
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [0123 of v0..v3 | 4567 of v0..v3]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// q . k[r] for 8 rows k[r] of D floats: lane l of row r's accumulator sums d = l, l + 8, ... in order, then hsum8.
// A score's bits depend only on q and its own row, not on the other 7.
inline __m256 dot8(const float* q, const float* const k[8], int64_t D) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[r] + d), acc[r]);
  }
  if (d < D) {
    const __m256 qv = load_d(q, d, D);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, load_d(k[r], d, D), acc[r]);
  }
  return hsum8(acc);
}

// out[d0 .. d0 + 8N) = a * sum_j p[j] v[j][d0 ..] over j < L, each element summed over j in order from 0; the N
// vectors stay in registers. The last vector may be partial (masked loads and store) when `tail` is set.
template <int N, bool tail>
inline void weighted_block(const float* p, const float* const* v, int64_t L, float a, float* out, int64_t d0,
                           int64_t D) {
  __m256 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i mask = tail_mask(D - (d0 + 8 * (N - 1)));
  for (int64_t j = 0; j < L; ++j) {
    if (d0 == 0 && j + kAhead < L) prefetch(v[j + kAhead], D);
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int i = 0; i < N; ++i) {
      const float* x = v[j] + d0 + 8 * i;
      acc[i] = _mm256_fmadd_ps(pj, tail && i == N - 1 ? _mm256_maskload_ps(x, mask) : _mm256_loadu_ps(x), acc[i]);
    }
  }
  for (int i = 0; i < N; ++i) {
    const __m256 o = _mm256_mul_ps(acc[i], _mm256_set1_ps(a));
    if (tail && i == N - 1) _mm256_maskstore_ps(out + d0 + 8 * i, mask, o);
    else _mm256_storeu_ps(out + d0 + 8 * i, o);
  }
}

// out[0..D) = a * sum_j p[j] v[j] for j < L: 64 floats at a time, then what is left (the same sums either way).
inline void weighted_rows(const float* p, const float* const* v, int64_t L, float a, float* out, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_block<8, false>(p, v, L, a, out, d0, D);
  switch ((D - d0) / 8) {  // whole vectors left: 0 .. 7
    case 1: weighted_block<1, false>(p, v, L, a, out, d0, D); break;
    case 2: weighted_block<2, false>(p, v, L, a, out, d0, D); break;
    case 3: weighted_block<3, false>(p, v, L, a, out, d0, D); break;
    case 4: weighted_block<4, false>(p, v, L, a, out, d0, D); break;
    case 5: weighted_block<5, false>(p, v, L, a, out, d0, D); break;
    case 6: weighted_block<6, false>(p, v, L, a, out, d0, D); break;
    case 7: weighted_block<7, false>(p, v, L, a, out, d0, D); break;
  }
  d0 += (D - d0) / 8 * 8;
  if (d0 < D) weighted_block<1, true>(p, v, L, a, out, d0, D);  // a head dim that is not a multiple of 8
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

// The G query heads of one KV head for one query (q_g at q + g * q_stride) against the keys whose K and V rows are
// k[0..L), v[0..L): out[g] (D floats each) = softmax(s) . V. The G heads share each K/V row while it is in L1;
// s is scratch.
void attend_query(const float* const* k, const float* const* v, int64_t L, const float* q, int64_t q_stride,
                  int64_t G, int64_t D, float sc, float cap, std::vector<float>& s, float* out) {
  const int64_t Lp = (L + 7) & ~int64_t(7);
  s.resize(G * Lp);
  for (int64_t j = 0; j < L; j += 8) {
    const float* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = k[std::min(j + r, L - 1)];  // past L: a repeat, its score unused
    for (int64_t r = j + 8; r < std::min(j + 16, L); ++r) prefetch(k[r], D);  // the next group's rows
    for (int64_t g = 0; g < G; ++g) {
      alignas(32) float x[8];
      _mm256_store_ps(x, _mm256_mul_ps(_mm256_set1_ps(sc), dot8(q + g * q_stride, rows, D)));
      for (int r = 0; r < 8; ++r) s[g * Lp + j + r] = cap > 0.f ? float(cap * std::tanh(double(x[r]) / cap)) : x[r];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float sum = exp_shifted(s.data() + g * Lp, L);
    weighted_rows(s.data() + g * Lp, v, L, 1.f / sum, out + g * D, D);
  }
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
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale), cap = float(softcap);
  parallel_for(int64_t(chunks.size()) * KVH, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> s;                  // [G, keys] scores, then exponentials
    std::vector<const float*> krow, vrow;  // K and V rows of the sequence's tokens 0 .. n - 1, head kvh
    for (int64_t task = task0; task < task1; ++task) {
      const auto [b, i0] = chunks[task / KVH];
      const int64_t kvh = task % KVH, n = lens[b], L = cu[b + 1] - cu[b];
      const int64_t i1 = std::min(i0 + kQueryChunk, cu[b + 1]), last = n - L + (i1 - cu[b]);  // keys < last
      krow.resize(last), vrow.resize(last);
      for (int64_t j = 0; j < last; ++j) {
        const int64_t slot = int64_t(tables[b * W + j / BS]) * BS + j % BS;
        krow[j] = kp + (slot * KVH + kvh) * D, vrow[j] = vp + (slot * KVH + kvh) * D;
      }
      for (int64_t t = i0; t < i1; ++t) {
        const int64_t p = n - L + (t - cu[b]), first = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
        attend_query(krow.data() + first, vrow.data() + first, p + 1 - first,
                     qp + t * q.stride(0) + kvh * G * q.stride(1), q.stride(1), G, D, sc, cap, s,
                     op + (t * H + kvh * G) * D);
      }
    }
  });
  return out;
}

}  // namespace mistralrs_cpu
