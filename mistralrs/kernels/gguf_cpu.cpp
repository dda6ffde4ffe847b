// CPU GGUF matmul: y[M, N] = x[M, K] @ W[N, K].T with W read straight from its GGUF blocks (AVX2, FMA, F16C).
// Built with the other CPU kernels by kernels/cpu_ext.py; called from kernels/gguf_cpu.py; the block layouts are in
// kernels/dequant.py.
//
// Every supported type is read as groups of 32 consecutive weights: one block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or one eighth of
// a 256-weight block (Q4_K, Q5_K, Q6_K). A type's groups() decodes a block into, per group g,
//     q     32 integers in one register, byte l = weight l of the group (signed for kSigned types, else 0..31)
//     d_lo  scale of weights 0..15, d_hi of 16..31 (equal except in Q6_K, whose scales cover 16 weights)
//     mn    the group's offset (Q4_1's m, the K-quants' -dmin * m; 0 elsewhere)
// so that w[l] = d * q[l] + mn, with the float operations of kernels/dequant.py.
//
// Two paths, picked by the caller:
//   int8  (the default, any number of rows of x): x is rounded to int8 in blocks of 32 (scale amax / 127,
//         llama.cpp's Q8_0 activations), then each group is one integer dot product per row of x (maddubs + madd)
//         and one FMA of its scale. Rows of W are split over threads (threads_cpu.h); each row of W is decoded once
//         per R rows of x (R = 8, then 4, 2, 1; its bytes stay in L1 for the next R), the rows of x taken kSlabRows
//         at a time so that their int8 blocks stay in L2. Each row of y is computed the same way whatever M, the
//         other rows and the thread count: a token gets the same result alone, in a batch or in a prefill.
//   gemm  (exact, on request): W dequantized `tile` rows at a time (the reference's weights exactly) into a float
//         scratch that stays in L2, multiplied with at::mm; the tiles are spread over the threads.
// Why int8 activations: against an f32 variant (each group converted to floats and FMA'd against float x, exact up
// to summation order), measured on a 2-core EPYC (Zen 2), 1 thread: 1.7-2.3x faster at M = 1 on one matrix in
// cache, 1.4x on a whole SmolLM2-135M decode step (96 MB of weights streamed from DRAM), 1.5x at M = 16. The price is
// x's rounding, ~0.5% of the output's scale; llama.cpp's CPU path pays the same.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include "simd_cpu.h"
#include "threads_cpu.h"

#include <cstdint>
#include <cstring>

namespace {

using mistralrs_cpu::hsum;
using mistralrs_cpu::parallel_for;
using mistralrs_cpu::parallel_for_torch;

enum GGMLType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 16 bytes of nibbles -> 32 bytes: low nibbles (weights 0..15) then high nibbles (16..31).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i raw = load16(p), m4 = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
}

// Q5_0 / Q5_1: bit l of the 32-bit qh is bit 4 of weight l -> 16 in byte l where set, else 0 (llama.cpp's
// bytes_from_bits_32: spread each qh byte over 8 bytes, then test one bit per byte).
inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes (dequant.py's _k_scales).
inline void k_scales(const uint8_t* s, uint8_t sc[8], uint8_t m[8]) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    m[i] = s[4 + i] & 63;
    sc[4 + i] = (s[8 + i] & 15) | ((s[i] >> 6) << 4);
    m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 6) << 4);
  }
}

struct TQ4_0 {
  static constexpr int kQK = 32, kBytes = 18;
  static constexpr bool kSigned = true, kHasMin = false, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    f(0, _mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8)), d, d, 0.f);
  }
};

struct TQ4_1 {
  static constexpr int kQK = 32, kBytes = 20;
  static constexpr bool kSigned = false, kHasMin = true, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    f(0, nibbles(b + 4), d, d, f16(b + 2));
  }
};

struct TQ5_0 {  // d, qh[4], qs[16]: w = d * (q - 16)
  static constexpr int kQK = 32, kBytes = 22;
  static constexpr bool kSigned = true, kHasMin = false, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    const __m256i q = _mm256_or_si256(nibbles(b + 6), fifth_bits(b + 2));
    f(0, _mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, 0.f);
  }
};

struct TQ5_1 {  // d, m, qh[4], qs[16]: w = d * q + m
  static constexpr int kQK = 32, kBytes = 24;
  static constexpr bool kSigned = false, kHasMin = true, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    f(0, _mm256_or_si256(nibbles(b + 8), fifth_bits(b + 4)), d, d, f16(b + 2));
  }
};

struct TQ8_0 {
  static constexpr int kQK = 32, kBytes = 34;
  static constexpr bool kSigned = true, kHasMin = false, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    f(0, load32(b + 2), d, d, 0.f);
  }
};

struct TQ4_K {
  static constexpr int kQK = 256, kBytes = 144;
  static constexpr bool kSigned = false, kHasMin = true, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t sc[8], m[8];
    k_scales(b + 4, sc, m);
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {  // qs[32c + l]: low nibble sub-block 2c, high nibble 2c + 1
      const __m256i raw = load32(b + 16 + 32 * c);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * c + h;
        const __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(raw, 4) : raw, m4);
        const float ds = d * float(sc[s]);
        f(s, q, ds, ds, -(dmin * float(m[s])));
      }
    }
  }
};

struct TQ5_K {
  static constexpr int kQK = 256, kBytes = 176;
  static constexpr bool kSigned = false, kHasMin = true, kSplit = false;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t sc[8], m[8];
    k_scales(b + 4, sc, m);
    const __m256i m4 = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16), qh = load32(b + 16);
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = load32(b + 48 + 32 * c);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * c + h;
        const __m256i bit = _mm256_set1_epi8(char(1 << s));  // bit s of qh[l] is bit 4 of weight l
        const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), bit4);
        const __m256i q = _mm256_or_si256(_mm256_and_si256(h ? _mm256_srli_epi16(raw, 4) : raw, m4), high);
        const float ds = d * float(sc[s]);
        f(s, q, ds, ds, -(dmin * float(m[s])));
      }
    }
  }
};

struct TQ6_K {
  static constexpr int kQK = 256, kBytes = 210;
  static constexpr bool kSigned = true, kHasMin = false, kSplit = true;
  template <class F> static void groups(const uint8_t* b, F&& f) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30), c32 = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {  // half h: 128 weights
      const __m256i l0 = load32(ql + 64 * h), l1 = load32(ql + 64 * h + 32), hb = load32(qh + 32 * h);
      // quarter j: nibble j / 2 of ql[64h + 32 (j % 2) + l], bits 2j of qh[32h + l] as bits 4..5
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2)),
          _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2))};
      for (int j = 0; j < 4; ++j) {
        const int g = 4 * h + j;
        f(g, _mm256_sub_epi8(q[j], c32), d * float(sc[2 * g]), d * float(sc[2 * g + 1]), 0.f);
      }
    }
  }
};

// The group's 32 weights as floats, w[l] = d * q[l] + mn (dequant.py's operations: a product, then the offset).
template <class T>
inline void to_f32(__m256i q, float d_lo, float d_hi, float mn, __m256 w[4]) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int v = 0; v < 4; ++v) {
    const __m256i i32 = T::kSigned ? _mm256_cvtepi8_epi32(parts[v]) : _mm256_cvtepu8_epi32(parts[v]);
    w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(v < 2 ? d_lo : d_hi));
    if (T::kHasMin) w[v] = _mm256_add_ps(w[v], _mm256_set1_ps(mn));
  }
}

// x rounded to int8 in blocks of 32: x ~ d * q, s = d * sum(q) (for the offset terms).
struct XBlock {
  float d, s;
  int8_t q[32];
};

void quantize_row(const float* x, int64_t K, XBlock* out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < K / 32; ++i) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 32 * i + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i qi[4];
    for (int j = 0; j < 4; ++j)
      qi[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT));
    // pack 4 x 8 int32 -> 32 int8; packs work within 128-bit lanes, the permute puts them back in order
    const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i].q), p8);
    const __m256i sum16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p8);
    const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, _mm256_set1_epi16(1)));
    out[i].d = d;
    out[i].s = d * hsum(sum);
  }
}

// out[r] = xq_r . w for one row w of W and R rows of int8-rounded x (K / 32 blocks each).
template <class T, int R>
void dot_q8(const uint8_t* w, const XBlock* const* x, int64_t K, float* out) {
  __m256 acc[R];
  float offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < K / T::kQK; ++i) {
    T::groups(w + i * T::kBytes, [&](int g, __m256i q, float d_lo, float d_hi, float mn) {
      // maddubs multiplies unsigned by signed bytes: a signed q goes in as |q|, its sign moved onto x
      const __m256i uq = T::kSigned ? _mm256_sign_epi8(q, q) : q;
      const int64_t blk = i * (T::kQK / 32) + g;
      for (int r = 0; r < R; ++r) {
        const XBlock& xb = x[r][blk];
        __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
        if (T::kSigned) y = _mm256_sign_epi8(y, q);
        // int16 pairs (|q| <= 63, |y| <= 127: no saturation), then int32 quads: lanes 0..3 <- weights 0..15
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(uq, y), ones));
        const __m256 scale = T::kSplit ? _mm256_set_m128(_mm_set1_ps(d_hi * xb.d), _mm_set1_ps(d_lo * xb.d))
                                       : _mm256_set1_ps(d_lo * xb.d);
        acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
        if (T::kHasMin) offset[r] += mn * xb.s;
      }
    });
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + offset[r];
}

// Rows of W ahead of the one being read to prefetch: the hardware prefetcher alone left a SmolLM2 decode step's
// weight stream at 0.7x the speed (measured with 0, 2, 4, 8 and 16 rows ahead: 4 and more are alike).
constexpr int64_t kPrefetchRows = 4;

// y[m, n] for n in [n0, n1) and rows [m0, m1) of x: each row of W against up to R rows of x at a time;
// dot(std::integral_constant<int, rows>, m, w_n, out) computes out[r] = x[m + r] . w_n.
template <int R, class Dot>
void gemv_rows(Dot&& dot, const uint8_t* w, int64_t row_bytes, float* y, int64_t m0, int64_t m1, int64_t N,
               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * row_bytes;
    if (n + kPrefetchRows < n1)
      for (int64_t b = 0; b < row_bytes; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wn + kPrefetchRows * row_bytes + b), _MM_HINT_T0);
    int64_t m = m0;
    auto tile = [&](auto rows) {
      float out[rows];
      dot(rows, m, wn, out);
      for (int r = 0; r < rows; ++r) y[(m + r) * N + n] = out[r];
      m += rows;
    };
    for (; m + R <= m1;) tile(std::integral_constant<int, R>());
    if (R > 4 && m + 4 <= m1) tile(std::integral_constant<int, 4>());
    if (m + 2 <= m1) tile(std::integral_constant<int, 2>());
    if (m < m1) tile(std::integral_constant<int, 1>());
  }
}

// Rows [n0, n1) of W as floats, [n1 - n0, K] at out.
template <class T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * row_bytes;
    float* o = out + (n - n0) * K;
    for (int64_t i = 0; i < K / T::kQK; ++i) {
      T::groups(wn + i * T::kBytes, [&](int g, __m256i q, float d_lo, float d_hi, float mn) {
        __m256 wv[4];
        to_f32<T>(q, d_lo, d_hi, mn, wv);
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + i * T::kQK + 32 * g + 8 * v, wv[v]);
      });
    }
  }
}

constexpr int64_t kGrain = 16;  // rows of W per parallel_for task at least: a task should outlast its dispatch
// Rows of x a chunk of W meets at a time: their int8 blocks (K / 32 * 36 bytes a row: 110 KB at K = 1536) stay in
// L2 while the chunk's rows of W go by, so a prompt's x is not streamed from memory once per row of W.
constexpr int64_t kSlabRows = 64;

template <class T>
void gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), rb = w.size(1);
  std::vector<XBlock> xq(M * (K / 32));
  const float* xp = x.data_ptr<float>();
  parallel_for(M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * K, K, xq.data() + m * (K / 32));
  });
  auto dot = [&](auto rows, int64_t m, const uint8_t* wn, float* out) {
    const XBlock* xr[rows];
    for (int r = 0; r < rows; ++r) xr[r] = xq.data() + (m + r) * (K / 32);
    dot_q8<T, rows>(wn, xr, K, out);
  };
  parallel_for(N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kSlabRows)
      gemv_rows<8>(dot, w.data_ptr<uint8_t>(), rb, y.data_ptr<float>(), m0, std::min(M, m0 + kSlabRows), N, n0, n1);
  });
}

// Many rows of x: W in tiles of `tile` rows, spread over the team; each thread dequantizes a tile into its own
// float scratch (it stays in L2) and multiplies it with at::mm, which runs serially on the team's threads.
template <class T>
void gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t tile) {
  const int64_t K = x.size(1), N = y.size(1), rb = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  parallel_for_torch((N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor scratch = at::empty({std::min(tile, N), K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, n1 = std::min(N, n0 + tile);
      dequant_rows<T>(wp, rb, K, n0, n1, scratch.data_ptr<float>());
      y.narrow(1, n0, n1 - n0).copy_(at::mm(x, scratch.narrow(0, 0, n1 - n0).t()));
    }
  });
}

template <class T>
void run(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t gemm_tile) {
  if (gemm_tile > 0) gemm<T>(x, w, y, gemm_tile);
  else gemv<T>(x, w, y);
}

}  // namespace

namespace mistralrs_cpu {

// Calls f(Tag<T>()) with T the block type of qtype, once w's rows are checked to hold K weights of it.
template <class T> struct Tag { using type = T; };

template <class F>
void with_type(int64_t qtype, int64_t K, const at::Tensor& w, F&& f) {
  auto go = [&](auto tag) {
    using T = typename decltype(tag)::type;
    TORCH_CHECK(K % T::kQK == 0 && w.size(1) == K / T::kQK * T::kBytes, "gguf_cpu: GGML type ", qtype,
                " rows need K % ", T::kQK, " == 0 and K / ", T::kQK, " * ", T::kBytes, " bytes; got K = ", K,
                " and ", w.size(1), " bytes");
    f(tag);
  };
  switch (qtype) {
    case Q4_0: go(Tag<TQ4_0>()); break;
    case Q4_1: go(Tag<TQ4_1>()); break;
    case Q5_0: go(Tag<TQ5_0>()); break;
    case Q5_1: go(Tag<TQ5_1>()); break;
    case Q8_0: go(Tag<TQ8_0>()); break;
    case Q4_K: go(Tag<TQ4_K>()); break;
    case Q5_K: go(Tag<TQ5_K>()); break;
    case Q6_K: go(Tag<TQ6_K>()); break;
    default: TORCH_CHECK(false, "gguf_cpu: no kernel for GGML type ", qtype);
  }
}

// gemm_tile = 0: the gemv path; > 0: the gemm path with tiles of that many rows of W.
at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t N, int64_t K,
                       int64_t gemm_tile) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "gguf_cpu: x must be a contiguous CPU float32 [M, ", K, "] tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.scalar_type() == at::kByte && w.is_contiguous() && w.is_cpu(),
              "gguf_cpu: qweight must be a contiguous CPU uint8 [", N, ", row_bytes] tensor");
  TORCH_CHECK(gemm_tile >= 0, "gguf_cpu: gemm_tile must be >= 0, got ", gemm_tile);
  RECORD_FUNCTION(gemm_tile > 0 ? "mistralrs::gguf_matmul(gemm)" : "mistralrs::gguf_matmul(gemv)", {});
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (y.numel() == 0) return y;
  with_type(qtype, K, w, [&](auto tag) { run<typename decltype(tag)::type>(x, w, y, gemm_tile); });
  return y;
}

// Rows ids of W [N, K] as float32 [T, K]: an embedding lookup (the reference's dequantized values exactly).
at::Tensor gguf_rows(const at::Tensor& w, int64_t qtype, int64_t K, const at::Tensor& ids) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.is_cpu(),
              "gguf_cpu.gguf_rows: qweight must be a contiguous CPU uint8 [N, row_bytes] tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "gguf_cpu.gguf_rows: ids must be a contiguous int64 [T] tensor");
  RECORD_FUNCTION("mistralrs::gguf_rows", {});
  const int64_t T = ids.size(0), N = w.size(0), rb = w.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < N, "gguf_cpu.gguf_rows: id ", ip[t], " outside [0, ", N, ")");
  at::Tensor out = at::empty({T, K}, w.options().dtype(at::kFloat));
  with_type(qtype, K, w, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    for (int64_t t = 0; t < T; ++t)
      dequant_rows<T_>(w.data_ptr<uint8_t>(), rb, K, ip[t], ip[t] + 1, out.data_ptr<float>() + t * K);
  });
  return out;
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace mistralrs_cpu
