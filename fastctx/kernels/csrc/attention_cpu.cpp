// Attention over a paged KV cache on CPU: prefill chunks and decodes of a whole
// batch in one call, dense or sparse per request.
//
// K and V are read where the engine keeps them. Each is a logical
// [blocks, kv_heads, block_size, head_dim] tensor with arbitrary strides, so the
// same code reads vLLM's CPU cache (K stored dims-major inside a block), a CUDA
// style cache, or plain contiguous [kv_heads, tokens, head_dim] tensors (one
// block of `tokens`). A request's block table row maps its logical blocks to
// physical ones. Nothing is gathered into a contiguous copy: score tiles are
// sgemm calls on the cache memory itself (float caches); other dtypes are
// converted tile by tile.
//
// Per request, what the queries read:
//   dense  - every key up to the query's position (causal);
//   window - the first `sink` keys and the last `local` keys up to the query
//            (StreamingLLM / A-shape), exact per query row;
//   index  - the key ranges and single columns a sparse index lists for the
//            query's block, causal on top.
// Query positions are explicit when given (scattered recompute positions),
// otherwise a request's queries are its last q_len positions.
//
// Work items: dense and window requests pack the query heads that share a KV
// head into one item (each K/V tile is read once for the group); index
// requests work per (head, index block). When a batch has too few items to
// keep every thread busy (a few decodes), long items are split along the keys
// and merged by their log-sum-exp afterwards.
#include <ATen/native/CPUBlas.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int kTile = 512;     // keys per tile: K/V of a tile stay in L2 while every row of an item reads them
constexpr int kGroupRows = 128;  // packed query rows (tokens x heads) per grouped item, sgemm path
constexpr int kMicroRows = 12;   // query rows per register-blocked sub-tile (micro-kernel path)
constexpr int kAmxRows = 64;     // query rows per AMX sub-tile (one brgemm call scores them all)
constexpr int kAmxMinRows = 48;  // fewer query rows in an item: micro-kernels instead of AMX
constexpr int kAmxKeys = 128;    // keys per VNNI-packed K/V chunk of the AMX path (one brgemm each)
constexpr int kMicroGatherBelow = 8;  // the micro-kernels read ranges in place down to this length
constexpr int kMicroGroupRows = 384;
constexpr int kAmxGroupRows = 384;  // AMX path: packing a tile costs several sub-tiles' compute, reuse it more  // rows per grouped item on the micro-kernel path (more reuse per tile)
constexpr int kEstRows = 16;   // query rows per estimation tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum Mode : int { kSkip = -1, kDense = 0, kWindow = 1, kIndex = 2 };

// Row-major C[m, n] = alpha * A[m, k] @ B[n, k]^T + beta * C, via column-major sgemm.
inline void gemm_abt(int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                     int ldb, float beta, float* c, int ldc) {
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C[m, n] = alpha * A[m, k] @ B[k, n] + beta * C.
inline void gemm_ab(int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                    int ldb, float beta, float* c, int ldc) {
  sgemm_("N", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// exp(x) for 8 floats (Cephes polynomial, relative error ~1e-7). Inputs below
// -87 (masked scores are -inf) give ~1e-38, not 0: negligible against a row sum
// that is at least 1.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum256(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float row_max(const float* s, int n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  float r = hmax256(m);
  for (; j < n; ++j) r = std::max(r, s[j]);
  return r;
}

// s[j] = exp(s[j] - shift); returns the sum.
inline float exp_shift_sum(float* s, int n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum256(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}
#else
inline float row_max(const float* s, int n) {
  float r = kNegInf;
  for (int j = 0; j < n; ++j) r = std::max(r, s[j]);
  return r;
}

inline float exp_shift_sum(float* s, int n, float shift) {
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Register-blocked micro-kernels for AVX-512 hosts. K is read dims-major (vLLM's CPU
// cache layout, [head_dim][keys] with a stride), V row-major: both straight from the
// cache, no packing, with the packed query rows broadcast from memory.
#define FASTCTX_MICRO 1

inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.0f));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

inline float row_max512(const float* s, int n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(n - j), s + j));
  return _mm512_reduce_max_ps(m);
}

// s[j] = exp(s[j] - shift); returns the sum.
inline float exp_shift_sum512(float* s, int n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 mk = tail_mask(n - j);
    __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), sh));
    _mm512_mask_storeu_ps(s + j, mk, p);
    acc = _mm512_mask_add_ps(acc, mk, acc, p);
  }
  return _mm512_reduce_add_ps(acc);
}

// 16 keys' values as floats: float loads as they are, bf16 widened on load (the top half of
// a float), so bf16 caches are read in place.
inline __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mk) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// S[r][0:cols] = q[r] . K[:, 0:cols] for R rows, cols <= 32; K dims-major with stride ldk.
// Two key vectors by up to 12 rows: each K load feeds 12 FMAs, so the K tile streams from
// L2 at half the rate a wider, shorter block would need.
template <int R, typename TK>
inline void qk_micro(const float* q, int dim, const TK* k, int64_t ldk, int cols, float* s, int lds) {
  const __mmask16 m0 = tail_mask(cols), m1 = cols > 16 ? tail_mask(cols - 16) : (__mmask16)0;
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    const __m512 b0 = load16(k + d * ldk, m0), b1 = load16(k + d * ldk + 16, m1);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(q[r * dim + d]);
      acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s + r * lds, m0, acc0[r]);
    _mm512_mask_storeu_ps(s + r * lds + 16, m1, acc1[r]);
  }
}

// acc[r][0:16*NV] += P[r][0:n] . V[0:n][:] for R rows; V row-major with stride ldv.
template <int R, int NV, typename TV>
inline void pv_micro(const float* p, int ldp, const TV* v, int64_t ldv, int n, float* acc, int dim) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) c[r][x] = _mm512_loadu_ps(acc + r * dim + 16 * x);
  for (int j = 0; j < n; ++j) {
    __m512 b[NV];
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) b[x] = load16(v + j * ldv + 16 * x, (__mmask16)0xFFFF);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 8
      for (int x = 0; x < NV; ++x) c[r][x] = _mm512_fmadd_ps(a, b[x], c[r][x]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) _mm512_storeu_ps(acc + r * dim + 16 * x, c[r][x]);
}

inline bool micro_dim(int dim) { return dim == 32 || dim == 64 || dim == 128; }

#ifdef __AVX512BF16__
// bf16 pairs (vdpbf16ps) for bf16 caches read in place: two dims (QK) or two keys (PV) per
// multiply, no widening. Interleaving two rows with unpacklo/hi_epi16 permutes columns within
// 128-bit lanes; kPairOrder maps the "lo"/"hi" results back to natural column order.
alignas(64) constexpr int kPairOrder[32] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23,
                                            8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
// Natural columns 0..31 (two vectors) into the "lo" and "hi" order.
alignas(64) constexpr int kPairLo[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
alignas(64) constexpr int kPairHi[16] = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
inline __m512i bf16_pair(const at::BFloat16* p) {  // p[0], p[1] broadcast as one 32-bit pair
  uint32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32((int)pair);
}

// Unscaled S[r][0:cols] = q[r] . K[:, 0:cols], cols <= 32 * NCH, bf16 queries and dims-major
// bf16 K. Few rows (decodes) take NCH = 4: a whole 128-key cache block per pair of dim rows, so K
// is read sequentially (32-key slices would touch head_dim lines at once, too many streams for
// the hardware prefetcher).
template <int R, int NCH>
inline void qk_pairs(const at::BFloat16* q, int dim, const at::BFloat16* k, int64_t ldk, int cols, float* s,
                     int lds, const at::BFloat16* next_k) {
  __mmask32 mk[NCH];
#pragma GCC unroll 4
  for (int c = 0; c < NCH; ++c) {
    const int left = cols - 32 * c;
    mk[c] = left >= 32 ? (__mmask32)0xFFFFFFFFu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
  }
  __m512 lo[R][NCH], hi[R][NCH];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NCH; ++c) lo[r][c] = hi[r][c] = _mm512_setzero_ps();
  for (int d = 0; d < dim; d += 2) {
    if (next_k)
#pragma GCC unroll 4
      for (int c = 0; c < NCH; ++c) {
        _mm_prefetch((const char*)(next_k + d * ldk + 32 * c), _MM_HINT_T1);
        _mm_prefetch((const char*)(next_k + (d + 1) * ldk + 32 * c), _MM_HINT_T1);
      }
    __m512bh a[NCH], b[NCH];
#pragma GCC unroll 4
    for (int c = 0; c < NCH; ++c) {
      const __m512i k0 = _mm512_maskz_loadu_epi16(mk[c], k + d * ldk + 32 * c);
      const __m512i k1 = _mm512_maskz_loadu_epi16(mk[c], k + (d + 1) * ldk + 32 * c);
      a[c] = as_bh(_mm512_unpacklo_epi16(k0, k1));
      b[c] = as_bh(_mm512_unpackhi_epi16(k0, k1));
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh qq = as_bh(bf16_pair(q + r * dim + d));
#pragma GCC unroll 4
      for (int c = 0; c < NCH; ++c) {
        lo[r][c] = _mm512_dpbf16_ps(lo[r][c], a[c], qq);
        hi[r][c] = _mm512_dpbf16_ps(hi[r][c], b[c], qq);
      }
    }
  }
  const __m512i o0 = _mm512_load_si512(kPairOrder), o1 = _mm512_load_si512(kPairOrder + 16);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NCH; ++c) {
      const int left = cols - 32 * c;
      if (left <= 0) break;
      const __mmask16 m0 = tail_mask(left), m1 = left > 16 ? tail_mask(left - 16) : (__mmask16)0;
      _mm512_mask_storeu_ps(s + r * lds + 32 * c, m0, _mm512_permutex2var_ps(lo[r][c], o0, hi[r][c]));
      _mm512_mask_storeu_ps(s + r * lds + 32 * c + 16, m1, _mm512_permutex2var_ps(lo[r][c], o1, hi[r][c]));
    }
}

// acc[r][0:32*NC] += P[r][0:n] . V[0:n][:], bf16 P (row stride ldp) and row-major bf16 V.
template <int R, int NC>
inline void pv_pairs(const at::BFloat16* p, int ldp, const at::BFloat16* v, int64_t ldv, int n, float* acc, int dim,
                     const at::BFloat16* next_v) {
  const __m512i ilo = _mm512_load_si512(kPairLo), ihi = _mm512_load_si512(kPairHi);
  __m512 lo[R][NC], hi[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 a0 = _mm512_loadu_ps(acc + r * dim + 32 * c), a1 = _mm512_loadu_ps(acc + r * dim + 32 * c + 16);
      lo[r][c] = _mm512_permutex2var_ps(a0, ilo, a1);
      hi[r][c] = _mm512_permutex2var_ps(a0, ihi, a1);
    }
  for (int j = 0; j < n; j += 2) {
    if (next_v)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        _mm_prefetch((const char*)(next_v + j * ldv + 32 * c), _MM_HINT_T1);
        _mm_prefetch((const char*)(next_v + (j + 1) * ldv + 32 * c), _MM_HINT_T1);
      }
    const bool pair = j + 1 < n;  // an odd tail pairs the last key with zeros
    __m512bh bl[NC], bh[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512i v0 = _mm512_loadu_si512(v + j * ldv + 32 * c);
      const __m512i v1 = pair ? _mm512_loadu_si512(v + (j + 1) * ldv + 32 * c) : _mm512_setzero_si512();
      bl[c] = as_bh(_mm512_unpacklo_epi16(v0, v1));
      bh[c] = as_bh(_mm512_unpackhi_epi16(v0, v1));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh pp = as_bh(pair ? bf16_pair(p + r * ldp + j)
                                     : _mm512_set1_epi32((int)(uint32_t)p[r * ldp + j].x));
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        lo[r][c] = _mm512_dpbf16_ps(lo[r][c], bl[c], pp);
        hi[r][c] = _mm512_dpbf16_ps(hi[r][c], bh[c], pp);
      }
    }
  }
  const __m512i o0 = _mm512_load_si512(kPairOrder), o1 = _mm512_load_si512(kPairOrder + 16);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      _mm512_storeu_ps(acc + r * dim + 32 * c, _mm512_permutex2var_ps(lo[r][c], o0, hi[r][c]));
      _mm512_storeu_ps(acc + r * dim + 32 * c + 16, _mm512_permutex2var_ps(lo[r][c], o1, hi[r][c]));
    }
}

// `next_k`: the next run's K (same layout, up to 128 keys), prefetched while this one is scored
// by few rows (decodes), which are bound by reading the cache.
inline void qk_rows_pairs(int rows, const at::BFloat16* q, int dim, const at::BFloat16* k, int64_t ldk, int cols,
                          float* s, int lds, const at::BFloat16* next_k) {
  if (rows <= 3) {  // decodes: up to 128 keys per pass (64 for runs that short: selected pages)
    for (int c0 = 0; c0 < cols; c0 += 128) {
      const int c = std::min(128, cols - c0);
      const at::BFloat16* pf = c0 + 128 < cols ? nullptr : next_k;
      if (c <= 64) {
        if (rows == 1) qk_pairs<1, 2>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
        else if (rows == 2) qk_pairs<2, 2>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
        else qk_pairs<3, 2>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
      } else if (rows == 1) {
        qk_pairs<1, 4>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
      } else if (rows == 2) {
        qk_pairs<2, 4>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
      } else {
        qk_pairs<3, 4>(q, dim, k + c0, ldk, c, s + c0, lds, pf);
      }
    }
    return;
  }
  for (int c0 = 0; c0 < cols; c0 += 32) {
    const int c = std::min(32, cols - c0);
    switch (rows) {
#define FASTCTX_QK(R) case R: qk_pairs<R, 1>(q, dim, k + c0, ldk, c, s + c0, lds, nullptr); break;
      FASTCTX_QK(4) FASTCTX_QK(5) FASTCTX_QK(6) FASTCTX_QK(7) FASTCTX_QK(8) FASTCTX_QK(9) FASTCTX_QK(10)
      FASTCTX_QK(11)
#undef FASTCTX_QK
      default: qk_pairs<12, 1>(q, dim, k + c0, ldk, c, s + c0, lds, nullptr); break;
    }
  }
}

// Rows in groups of R (2 * R * NC accumulators stay within 16), the last group smaller.
template <int R, int NC>
inline void pv_pairs_upto(int rr, const at::BFloat16* p, int ldp, const at::BFloat16* v, int64_t ldv, int n,
                          float* acc, int dim, const at::BFloat16* next_v) {
  if constexpr (R > 1)
    if (rr < R) return pv_pairs_upto<R - 1, NC>(rr, p, ldp, v, ldv, n, acc, dim, next_v);
  pv_pairs<R, NC>(p, ldp, v, ldv, n, acc, dim, next_v);
}

template <int NC>
inline void pv_rows_pairs_nc(int rows, const at::BFloat16* p, int ldp, const at::BFloat16* v, int64_t ldv, int n,
                             float* acc, int dim, const at::BFloat16* next_v) {
  constexpr int RP = 8 / NC;
  for (int r0 = 0; r0 < rows; r0 += RP)
    pv_pairs_upto<RP, NC>(std::min(RP, rows - r0), p + r0 * ldp, ldp, v, ldv, n, acc + r0 * dim, dim,
                          r0 == 0 ? next_v : nullptr);
}

inline void pv_rows_pairs(int rows, const at::BFloat16* p, int ldp, const at::BFloat16* v, int64_t ldv, int n,
                          float* acc, int dim, const at::BFloat16* next_v) {
  if (dim == 32) pv_rows_pairs_nc<1>(rows, p, ldp, v, ldv, n, acc, dim, next_v);
  else if (dim == 64) pv_rows_pairs_nc<2>(rows, p, ldp, v, ldv, n, acc, dim, next_v);
  else pv_rows_pairs_nc<4>(rows, p, ldp, v, ldv, n, acc, dim, next_v);
}
#define FASTCTX_PAIRS 1
#endif

// out[2i] = a[i], out[2i+1] = b[i] for i < len (len a multiple of 16): two bf16 rows into the
// VNNI pair layout brgemm reads (for K: consecutive dims; for V: consecutive keys).
inline void interleave_rows(const uint16_t* a, const uint16_t* b, int len, uint16_t* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  int i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512i x = _mm512_loadu_si512(a + i), y = _mm512_loadu_si512(b + i);
    _mm512_storeu_si512(out + 2 * i, _mm512_permutex2var_epi16(x, lo, y));
    _mm512_storeu_si512(out + 2 * i + 32, _mm512_permutex2var_epi16(x, hi, y));
  }
  for (; i < len; ++i) {
    out[2 * i] = a[i];
    out[2 * i + 1] = b[i];
  }
}

// Scores of `rows` (<= kMicroRows) packed queries against `cols` dims-major keys.
template <typename TK>
inline void qk_rows(int rows, const float* q, int dim, const TK* k, int64_t ldk, int cols, float* s, int lds) {
  for (int c0 = 0; c0 < cols; c0 += 32) {
    const int c = std::min(32, cols - c0);
    switch (rows) {
#define FASTCTX_QK(R) case R: qk_micro<R, TK>(q, dim, k + c0, ldk, c, s + c0, lds); break;
      FASTCTX_QK(1) FASTCTX_QK(2) FASTCTX_QK(3) FASTCTX_QK(4) FASTCTX_QK(5) FASTCTX_QK(6)
      FASTCTX_QK(7) FASTCTX_QK(8) FASTCTX_QK(9) FASTCTX_QK(10) FASTCTX_QK(11)
#undef FASTCTX_QK
      default: qk_micro<12, TK>(q, dim, k + c0, ldk, c, s + c0, lds); break;
    }
  }
}

template <int NV, typename TV>
inline void pv_rows_nv(int rows, const float* p, int ldp, const TV* v, int64_t ldv, int n, float* acc, int dim) {
  constexpr int RP = NV >= 8 ? 3 : 6;  // 24 accumulators at most
  for (int r0 = 0; r0 < rows; r0 += RP) {
    const int rr = std::min(RP, rows - r0);
    const float* pr = p + r0 * ldp;
    float* ar = acc + r0 * dim;
    switch (rr) {
      case 1: pv_micro<1, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
      case 2: pv_micro<2, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
      case 3: pv_micro<3, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
      case 4: pv_micro<4, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
      case 5: pv_micro<5, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
      default: pv_micro<RP, NV, TV>(pr, ldp, v, ldv, n, ar, dim); break;
    }
  }
}

template <typename TV>
inline void pv_rows(int rows, const float* p, int ldp, const TV* v, int64_t ldv, int n, float* acc, int dim) {
  if (dim == 32) pv_rows_nv<2, TV>(rows, p, ldp, v, ldv, n, acc, dim);
  else if (dim == 64) pv_rows_nv<4, TV>(rows, p, ldp, v, ldv, n, acc, dim);
  else pv_rows_nv<8, TV>(rows, p, ldp, v, ldv, n, acc, dim);
}
#endif

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// A logical [blocks, kv_heads, block_size, head_dim] view of K and V.
template <typename T>
struct KV {
  const T* k;
  const T* v;
  int64_t kb, kh, kt, kd;  // K strides: block, head, token, dim
  int64_t vb, vh, vt, vd;
  int block_size, dim;

  KV(const torch::Tensor& key, const torch::Tensor& value)
      : k(key.data_ptr<T>()), v(value.data_ptr<T>()),
        kb(key.stride(0)), kh(key.stride(1)), kt(key.stride(2)), kd(key.stride(3)),
        vb(value.stride(0)), vh(value.stride(1)), vt(value.stride(2)), vd(value.stride(3)),
        block_size((int)key.size(2)), dim((int)key.size(3)) {}

  const T* kp(int blk, int h, int tok) const { return k + blk * kb + h * kh + tok * kt; }
  const T* vp(int blk, int h, int tok) const { return v + blk * vb + h * vh + tok * vt; }
  // Float K rows [n, dim] or dims-major [dim, n] straight from the cache memory.
  bool k_rows() const { return std::is_same<T, float>::value && kd == 1; }
  bool k_cols() const { return std::is_same<T, float>::value && kt == 1 && kd != 1; }
  bool v_rows() const { return std::is_same<T, float>::value && vd == 1; }

  void copy_k(int blk, int h, int tok, int n, float* dst) const {  // n rows -> dst [n, dim]
    const T* base = kp(blk, h, tok);
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < dim; ++d) dst[(size_t)j * dim + d] = to_f(base[j * kt + d * kd]);
  }
  void copy_k_cols(int blk, int h, int tok, int n, float* dst, int ld) const {  // n keys -> dst [dim][ld]
    const T* base = kp(blk, h, tok);
    for (int d = 0; d < dim; ++d)
      for (int j = 0; j < n; ++j) dst[(size_t)d * ld + j] = to_f(base[j * kt + d * kd]);
  }
  void copy_v(int blk, int h, int tok, int n, float* dst) const {
    const T* base = vp(blk, h, tok);
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < dim; ++d) dst[(size_t)j * dim + d] = to_f(base[j * vt + d * vd]);
  }
};

struct Item {
  int req;
  int head0, nheads;  // query heads sharing one KV head
  int tok0, ntok;     // query tokens within the request
  int key_lo, key_hi;  // key positions of this part (split-KV); whole range when unsplit
  int group;          // first item of its split group, or -1 when unsplit
  int64_t scratch;    // float offset of the partial result (split items)
  double cost;
};

// What one request reads, and where its queries are.
struct Request {
  int q0, q_len, seq_len, mode, sink, local, slot, block0;
  const int* pos;  // explicit positions of its queries, or null
  int position(int t) const { return pos ? pos[t] : seq_len - q_len + t; }
};

// A run of a tile's keys and where their K and V are read: in place in the cache, from the
// tile's buffers, or from a request's column panel. K is dims-major ([dim][ldk], keys
// contiguous) or row-major ([keys][ldk]); V is row-major, or not readable in place (null:
// copied into the tile's V buffer when the tile is folded).
struct Segment {
  int col0, len;
  const float* k;
  int64_t ldk;
  bool k_dims_major;
  const float* v;
  int64_t ldv;
  int blk, tok;  // where V is, when v is null
  const at::BFloat16* kb = nullptr;  // bf16 K/V read in place (micro-kernels widen them on load)
  const at::BFloat16* vb = nullptr;
};

struct Scratch {
  std::vector<float> q, scores, acc, m, l, kbuf, vbuf;
  // bf16 AMX path: unscaled queries, staged K (dims-major) / V (row-major), their VNNI packs, P.
  std::vector<at::BFloat16> qb, kst, vst, kpack, vpack, pb;
  std::vector<int> rowpos, kpos;
  std::vector<uint8_t> valid;  // per tile key: read at all (panel columns a block does not list are not)
  std::vector<Segment> segs;
  int n = 0;  // keys in the current tile
  bool has_invalid = false;
  // Buffers only grow: a thread keeps its scratch from call to call (a decode step's attention
  // takes well under a millisecond; allocating and zeroing ~1 MB each call would show).
  template <typename V>
  static void grow(V& v, size_t n, typename V::value_type fill = {}) {
    if (v.size() < n) v.resize(n, fill);
  }
  void ensure(int rows, int score_rows, int dim, bool amx) {
    grow(q, (size_t)rows * dim);
    grow(scores, (size_t)std::max(score_rows, amx ? kAmxRows : 0) * kTile);
    grow(acc, (size_t)rows * dim);
    grow(m, rows);
    grow(l, rows);
    grow(kbuf, (size_t)kTile * dim);
    grow(vbuf, (size_t)kTile * dim);
    grow(rowpos, rows);
    grow(kpos, kTile);
    grow(valid, kTile, (uint8_t)1);
    if (amx) {
      grow(qb, (size_t)rows * dim);
      grow(kst, (size_t)dim * kTile);
      grow(vst, (size_t)kTile * dim);
      grow(kpack, (size_t)dim * kTile);
      grow(vpack, (size_t)kTile * dim);
      grow(pb, (size_t)kAmxRows * kTile);
    }
    segs.clear();
    n = 0;
    has_invalid = false;
  }
};

// One request's sparse-index columns for one head, gathered once: K dims-major [dim][n]
// and V row-major [n][dim] for the sorted union of the columns all its index blocks list.
// In vLLM's CPU layout one key's K spans head_dim cache lines, so gathering a column once
// per head instead of once per query block is what makes column-heavy indexes cheap.
struct Panel {
  const float* k = nullptr;
  const float* v = nullptr;
  const int* pos = nullptr;
  int n = 0;
  // bf16 caches on the bf16-pair micro-kernels: the panel stays bf16 (k, v null), so that its
  // tiles take the same bf16 dot products as the keys read in place.
  const at::BFloat16* kb = nullptr;
  const at::BFloat16* vb = nullptr;
};

template <typename T>
class ItemRunner {
 public:
  ItemRunner(const KV<T>& kv, Scratch& s, const Request& rq, const Item& it, const int* table, int kvh, bool micro,
             bool amx, bool pairs, float scale)
      : kv_(kv), s_(s), rq_(rq), it_(it), table_(table), kvh_(kvh), micro_(micro), amx_(amx), pairs_(pairs),
        scale_(scale) {}

  // Adds keys [start, end) (positions), split at block and tile boundaries.
  void add_range(int start, int end, int gather_below) {
    start = std::max(start, it_.key_lo);
    end = std::min(end, it_.key_hi);
    if (end <= start) return;
    if (amx_) return stage_range(start, end);
    if (end - start < gather_below) {
      for (int c = start; c < end; ++c) add_column(c);
      return;
    }
    const int bs = kv_.block_size;
    while (start < end) {
      if (s_.n == kTile) fold();
      const int blk = table_[start / bs], tok = start % bs;
      const int len = std::min({end - start, bs - tok, kTile - s_.n});
      if constexpr (std::is_same<T, at::BFloat16>::value) {
        if (micro_ && kv_.kt == 1 && kv_.kd != 1 && kv_.vd == 1) {  // vLLM's bf16 layout, read in place
          Segment g{s_.n, len, nullptr, kv_.kd, true, nullptr, kv_.vt, blk, tok};
          g.kb = kv_.kp(blk, kvh_, tok);
          g.vb = kv_.vp(blk, kvh_, tok);
          s_.segs.push_back(g);
          for (int j = 0; j < len; ++j) s_.kpos[s_.n + j] = start + j;
          s_.n += len;
          start += len;
          continue;
        }
      }
      if (micro_ ? kv_.k_cols() : kv_.k_rows() || kv_.k_cols()) {
        const bool dims_major = kv_.k_cols();
        s_.segs.push_back({s_.n, len, (const float*)kv_.kp(blk, kvh_, tok), dims_major ? kv_.kd : kv_.kt,
                           dims_major, kv_.v_rows() ? (const float*)kv_.vp(blk, kvh_, tok) : nullptr, kv_.vt,
                           blk, tok});
      } else {
        buffer_keys(blk, tok, len);
      }
      for (int j = 0; j < len; ++j) s_.kpos[s_.n + j] = start + j;
      s_.n += len;
      start += len;
    }
  }

  void add_column(int c) {
    if (c < it_.key_lo || c >= it_.key_hi) return;
    if (amx_) return stage_range(c, c + 1);
    if (s_.n == kTile) fold();
    const int bs = kv_.block_size;
    buffer_keys(table_[c / bs], c % bs, 1);
    s_.kpos[s_.n] = c;
    s_.n += 1;
  }

  // Adds the panel's columns up to `last_pos`, reading only those in `cols` (sorted or not,
  // -1 = empty): the others are masked, so the panel is scored in long in-place runs.
  void add_panel(const Panel& panel, const int* cols, int ncols, int last_pos) {
    const int w = (int)(std::upper_bound(panel.pos, panel.pos + panel.n, last_pos) - panel.pos);
    if (w == 0) return;
    member_.assign(w, 0);
    int listed = 0;
    for (int x = 0; x < ncols; ++x) {
      const int c = cols[x];
      if (c < 0 || c > last_pos || c < it_.key_lo || c >= it_.key_hi) continue;
      const int at = (int)(std::lower_bound(panel.pos, panel.pos + w, c) - panel.pos);
      if (at < w && panel.pos[at] == c && !member_[at]) member_[at] = 1, ++listed;
    }
    if (listed * 4 < w || amx_) {  // a sparse subset (or the AMX path, which stages keys): copy them
      for (int at = 0; at < w; ++at)
        if (member_[at]) add_panel_column(panel, at);
      return;
    }
    for (int start = 0; start < w;) {
      if (s_.n == kTile) fold();
      const int len = std::min(w - start, kTile - s_.n);
      if (panel.kb)
        s_.segs.push_back({s_.n, len, nullptr, panel.n, true, nullptr, kv_.dim, 0, 0, panel.kb + start,
                           panel.vb + (size_t)start * kv_.dim});
      else
        s_.segs.push_back({s_.n, len, panel.k + start, panel.n, true, panel.v + (size_t)start * kv_.dim, kv_.dim, 0, 0});
      for (int j = 0; j < len; ++j) {
        s_.kpos[s_.n + j] = panel.pos[start + j];
        s_.valid[s_.n + j] = member_[start + j];
        s_.has_invalid |= !member_[start + j];
      }
      s_.n += len;
      start += len;
    }
  }

  // Scores the tile against the packed queries and folds it into the online softmax.
  void fold() {
    if (s_.n == 0) return;
#ifdef FASTCTX_PAIRS
    if (amx_) {
      fold_amx();
      s_.n = 0;
      return;
    }
#endif
    for (Segment& g : s_.segs)  // V not row-major in place: one copy per tile
      if (!g.v && !g.vb) {
        kv_.copy_v(g.blk, kvh_, g.tok, g.len, s_.vbuf.data() + (size_t)g.col0 * kv_.dim);
        g.v = s_.vbuf.data() + (size_t)g.col0 * kv_.dim;
        g.ldv = kv_.dim;
      }
#ifdef FASTCTX_MICRO
    if (micro_) fold_micro(); else
#endif
    fold_gemm();
    if (s_.has_invalid) std::fill(s_.valid.begin(), s_.valid.begin() + s_.n, 1);
    s_.has_invalid = false;
    s_.segs.clear();
    s_.n = 0;
  }

 private:
  int rows_() const { return it_.ntok * it_.nheads; }

  // Copies keys into the tile's buffers: K dims-major [dim][kTile] for the micro-kernels,
  // row-major [kTile][dim] for sgemm; V row-major.
  void buffer_keys(int blk, int tok, int len) {
    float* k = micro_ ? s_.kbuf.data() + s_.n : s_.kbuf.data() + (size_t)s_.n * kv_.dim;
    if (micro_) kv_.copy_k_cols(blk, kvh_, tok, len, k, kTile);
    else kv_.copy_k(blk, kvh_, tok, len, k);
    float* v = s_.vbuf.data() + (size_t)s_.n * kv_.dim;
    kv_.copy_v(blk, kvh_, tok, len, v);
    push_buffered(len);
  }

  void add_panel_column(const Panel& panel, int at) {
    if (s_.n == kTile) fold();
    if (amx_) {
      stage_from(panel.k + at, panel.n, panel.v + (size_t)at * kv_.dim, 1);
      s_.kpos[s_.n] = panel.pos[at];
      s_.n += 1;
      return;
    }
    const int dim = kv_.dim;
    float* k = micro_ ? s_.kbuf.data() + s_.n : s_.kbuf.data() + (size_t)s_.n * dim;
    const int64_t stride = micro_ ? kTile : 1;
    float* v = s_.vbuf.data() + (size_t)s_.n * dim;
    if (panel.kb) {
      for (int d = 0; d < dim; ++d) k[d * stride] = to_f(panel.kb[(size_t)d * panel.n + at]);
      for (int d = 0; d < dim; ++d) v[d] = to_f(panel.vb[(size_t)at * dim + d]);
    } else {
      for (int d = 0; d < dim; ++d) k[d * stride] = panel.k[(size_t)d * panel.n + at];
      std::copy(panel.v + (size_t)at * dim, panel.v + (size_t)(at + 1) * dim, v);
    }
    push_buffered(1);
    s_.kpos[s_.n] = panel.pos[at];
    s_.n += 1;
  }

  void push_buffered(int len) {
    Segment* last = s_.segs.empty() ? nullptr : &s_.segs.back();
    const bool buffered = last && last->k == (micro_ ? s_.kbuf.data() + last->col0
                                                     : s_.kbuf.data() + (size_t)last->col0 * kv_.dim);
    if (buffered && last->col0 + last->len == s_.n) {
      last->len += len;
      return;
    }
    const int dim = kv_.dim;
    s_.segs.push_back({s_.n, len, micro_ ? s_.kbuf.data() + s_.n : s_.kbuf.data() + (size_t)s_.n * dim,
                       micro_ ? kTile : dim, micro_, s_.vbuf.data() + (size_t)s_.n * dim, dim, 0, 0});
  }

  bool visible(int j, int p) const {
    const int key = s_.kpos[j];
    if (key > p || (s_.has_invalid && !s_.valid[j])) return false;
    return rq_.mode != kWindow || key < rq_.sink || key > p - rq_.local;
  }

  // Whether every key of the tile is visible to rows at positions first_pos..last_pos,
  // given the tile's smallest and largest key.
  bool all_visible(int kmin, int kmax, int first_pos, int last_pos) const {
    if (s_.has_invalid || kmax > first_pos) return false;
    return rq_.mode != kWindow || kmax < rq_.sink || kmin > last_pos - rq_.local;
  }

  void key_extent(int n, int& kmin, int& kmax) const {
    kmin = kmax = s_.kpos[0];
    for (int j = 1; j < n; ++j) {
      kmin = std::min(kmin, s_.kpos[j]);
      kmax = std::max(kmax, s_.kpos[j]);
    }
  }

  void fold_gemm() {
    const int n = s_.n, rows = rows_(), dim = kv_.dim;
    float* S = s_.scores.data();
    const float* q = s_.q.data();
    for (const Segment& g : s_.segs) {
      if (g.k_dims_major) gemm_ab(rows, g.len, dim, 1.0f, q, dim, g.k, (int)g.ldk, 0.0f, S + g.col0, kTile);
      else gemm_abt(rows, g.len, dim, 1.0f, q, dim, g.k, (int)g.ldk, 0.0f, S + g.col0, kTile);
    }
    int kmin, kmax;
    key_extent(n, kmin, kmax);
    const bool every = all_visible(kmin, kmax, s_.rowpos[0], s_.rowpos[rows - 1]);
    for (int i = 0; i < rows; ++i) {
      float* si = S + (size_t)i * kTile;
      const int p = s_.rowpos[i];
      if (!every)
        for (int j = 0; j < n; ++j)
          if (!visible(j, p)) si[j] = kNegInf;
      const float m_new = std::max(s_.m[i], row_max(si, n));
      if (m_new == kNegInf) {  // nothing visible to this row yet
        std::fill(si, si + n, 0.0f);
        continue;
      }
      const float correction = std::exp(s_.m[i] - m_new);
      s_.l[i] = s_.l[i] * correction + exp_shift_sum(si, n, m_new);
      s_.m[i] = m_new;
      if (correction != 1.0f) {
        float* ai = s_.acc.data() + (size_t)i * dim;
        for (int d = 0; d < dim; ++d) ai[d] *= correction;
      }
    }
    for (const Segment& g : s_.segs)
      gemm_ab(rows, dim, g.len, 1.0f, S + g.col0, kTile, g.v, (int)g.ldv, 1.0f, s_.acc.data(), dim);
  }

#ifdef FASTCTX_MICRO
  // The tile in sub-tiles of kMicroRows query rows: scores stay in L1, the tile's K/V in L2.
  void fold_micro() {
    const int n = s_.n, rows = rows_(), dim = kv_.dim;
    bool ascending = true;
    for (int j = 1; j < n; ++j) ascending &= s_.kpos[j] > s_.kpos[j - 1];
    int kmin, kmax;
    key_extent(n, kmin, kmax);
    float* S = s_.scores.data();
    // bf16 cache read in place throughout the tile: bf16-pair dot products on the raw queries.
    bool pairs = pairs_;
    for (const Segment& g : s_.segs) pairs &= g.kb && g.vb;
    at::BFloat16* P = s_.pb.data();
    for (int r0 = 0; r0 < rows; r0 += kMicroRows) {
      const int rr = std::min(kMicroRows, rows - r0);
      const int first_pos = s_.rowpos[r0], last_pos = s_.rowpos[r0 + rr - 1];
      // Keys after the sub-tile's last query are read by none of its rows.
      const int w = ascending ? (int)(std::upper_bound(s_.kpos.begin(), s_.kpos.begin() + n, last_pos) -
                                      s_.kpos.begin())
                              : n;
      if (w == 0) continue;
      const float* q = s_.q.data() + (size_t)r0 * dim;
      for (size_t x = 0; x < s_.segs.size(); ++x) {
        const Segment& g = s_.segs[x];
        const int len = std::min(g.len, w - g.col0);
        if (len <= 0) continue;
#ifdef FASTCTX_PAIRS
        if (pairs) qk_rows_pairs(rr, s_.qb.data() + (size_t)r0 * dim, dim, g.kb, g.ldk, len, S + g.col0, kTile,
                                 x + 1 < s_.segs.size() ? s_.segs[x + 1].kb : s_.segs[0].vb);
        else
#endif
        if (g.kb) qk_rows(rr, q, dim, g.kb, g.ldk, len, S + g.col0, kTile);
        else qk_rows(rr, q, dim, g.k, g.ldk, len, S + g.col0, kTile);
      }
      const bool every = all_visible(kmin, ascending ? s_.kpos[w - 1] : kmax, first_pos, last_pos);
      for (int i = 0; i < rr; ++i) {
#ifdef FASTCTX_PAIRS
        if (pairs) softmax_row_bf16(r0 + i, S + (size_t)i * kTile, w, every, P + (size_t)i * kTile, (w + 15) / 16 * 16);
        else
#endif
        softmax_row(r0 + i, S + (size_t)i * kTile, w, every);
      }
      float* acc = s_.acc.data() + (size_t)r0 * dim;
      for (size_t x = 0; x < s_.segs.size(); ++x) {
        const Segment& g = s_.segs[x];
        const int len = std::min(g.len, w - g.col0);
        if (len <= 0) continue;
#ifdef FASTCTX_PAIRS
        if (pairs) pv_rows_pairs(rr, P + g.col0, kTile, g.vb, g.ldv, len, acc, dim,
                                 x + 1 < s_.segs.size() ? s_.segs[x + 1].vb : nullptr);
        else
#endif
        if (g.vb) pv_rows(rr, S + g.col0, kTile, g.vb, g.ldv, len, acc, dim);
        else pv_rows(rr, S + g.col0, kTile, g.v, g.ldv, len, acc, dim);
      }
    }
  }

#ifdef FASTCTX_PAIRS  // (AVX512-BF16 hosts: the bf16 conversions below need it)
  // softmax_row for unscaled scores, writing P as bf16 (zero up to `padded`) in the same pass
  // as the exponentials: two passes over the row in all (max, then exp + sum + store).
  void softmax_row_bf16(int row, float* si, int w, bool every, at::BFloat16* pi, int padded) {
    if (!every) mask_row(s_.rowpos[row], si, w);
    const float raw = row_max512(si, w);
    const __m256i zero = _mm256_setzero_si256();
    if (raw == kNegInf) {
      for (int j = 0; j < padded; j += 16) _mm256_storeu_si256((__m256i*)(pi + j), zero);
      return;
    }
    const float mx = raw * scale_;
    float& m = s_.m[row];
    if (m == kNegInf) {
      m = mx;
    } else if (mx > m + 8.0f) {
      const float correction = std::exp(m - mx);
      s_.l[row] *= correction;
      float* ai = s_.acc.data() + (size_t)row * kv_.dim;
      for (int d = 0; d < kv_.dim; ++d) ai[d] *= correction;
      m = mx;
    }
    const __m512 sc = _mm512_set1_ps(scale_), shift = _mm512_set1_ps(-m);
    __m512 sum = _mm512_setzero_ps();
    int j = 0;
    for (; j < w; j += 16) {
      const __mmask16 mk = tail_mask(w - j);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, si + j), sc, shift)));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256((__m256i*)(pi + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    for (; j < padded; j += 16) _mm256_storeu_si256((__m256i*)(pi + j), zero);
    s_.l[row] += _mm512_reduce_add_ps(sum);
  }
#endif

  // Sets the scores of keys the row at position p does not read to -inf, 16 keys at a time.
  void mask_row(int p, float* si, int w) const {
    const __m512i pos = _mm512_set1_epi32(p), sink = _mm512_set1_epi32(rq_.sink);
    const __m512i local_start = _mm512_set1_epi32(p - rq_.local);
    const __m512 neg_inf = _mm512_set1_ps(kNegInf);
    for (int j = 0; j < w; j += 16) {
      const __mmask16 mk = tail_mask(w - j);
      const __m512i key = _mm512_maskz_loadu_epi32(mk, s_.kpos.data() + j);
      __mmask16 hidden = _mm512_cmpgt_epi32_mask(key, pos);
      if (rq_.mode == kWindow)
        hidden |= ~(_mm512_cmplt_epi32_mask(key, sink) | _mm512_cmpgt_epi32_mask(key, local_start));
      if (s_.has_invalid) {
        const __m512i ok = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, s_.valid.data() + j));
        hidden |= _mm512_cmpeq_epi32_mask(ok, _mm512_setzero_si512());
      }
      hidden &= mk;
      if (hidden) _mm512_mask_storeu_ps(si + j, hidden, neg_inf);
    }
  }

  // Online softmax of one row over w keys, rescaling lazily: the running max moves only when
  // a score exceeds it by more than 8 (exp(8) ~ 3e3 stays far from float overflow), so the
  // row's accumulator is rarely touched.
  void softmax_row(int row, float* si, int w, bool every) {
    if (!every) mask_row(s_.rowpos[row], si, w);
    const float mx = row_max512(si, w);
    if (mx == kNegInf) {  // nothing visible to this row in this tile
      std::fill(si, si + w, 0.0f);
      return;
    }
    float& m = s_.m[row];
    if (m == kNegInf) {
      m = mx;
    } else if (mx > m + 8.0f) {
      const float correction = std::exp(m - mx);
      s_.l[row] *= correction;
      float* ai = s_.acc.data() + (size_t)row * kv_.dim;
      for (int d = 0; d < kv_.dim; ++d) ai[d] *= correction;
      m = mx;
    }
    s_.l[row] += exp_shift_sum512(si, w, m);
  }
#endif


  // ---- bf16 on AMX: keys staged in bf16, packed into VNNI 64-key chunks once per tile, then
  // scored and accumulated with oneDNN's brgemm (AMX tiles) per 32-row sub-tile.
  void stage_range(int start, int end) {
    const int bs = kv_.block_size;
    while (start < end) {
      if (s_.n == kTile) fold();
      const int blk = table_[start / bs], tok = start % bs;
      const int len = std::min({end - start, bs - tok, kTile - s_.n});
      stage_cache(blk, tok, len);
      for (int j = 0; j < len; ++j) s_.kpos[s_.n + j] = start + j;
      s_.n += len;
      start += len;
    }
  }

  void stage_cache(int blk, int tok, int len) {
    if constexpr (std::is_same<T, at::BFloat16>::value) {
      const int dim = kv_.dim;
      const T* k = kv_.kp(blk, kvh_, tok);
      const T* v = kv_.vp(blk, kvh_, tok);
      at::BFloat16* ks = s_.kst.data() + s_.n;
      at::BFloat16* vs = s_.vst.data() + (size_t)s_.n * dim;
      if (kv_.kt == 1) {  // vLLM's layout: each dim's keys are contiguous
        for (int d = 0; d < dim; ++d) std::copy(k + d * kv_.kd, k + d * kv_.kd + len, ks + (size_t)d * kTile);
      } else {
        for (int d = 0; d < dim; ++d)
          for (int j = 0; j < len; ++j) ks[(size_t)d * kTile + j] = k[j * kv_.kt + d * kv_.kd];
      }
      if (kv_.vd == 1) {
        for (int j = 0; j < len; ++j) std::copy(v + j * kv_.vt, v + j * kv_.vt + dim, vs + (size_t)j * dim);
      } else {
        for (int j = 0; j < len; ++j)
          for (int d = 0; d < dim; ++d) vs[(size_t)j * dim + d] = v[j * kv_.vt + d * kv_.vd];
      }
    }
  }

  void stage_from(const float* k, int64_t ldk, const float* v, int len) {  // float K dims-major, V rows
    const int dim = kv_.dim;
    for (int d = 0; d < dim; ++d)
      for (int j = 0; j < len; ++j) s_.kst[(size_t)d * kTile + s_.n + j] = at::BFloat16(k[d * ldk + j]);
    for (int j = 0; j < len * dim; ++j) s_.vst[(size_t)s_.n * dim + j] = at::BFloat16(v[j]);
  }

#ifdef FASTCTX_PAIRS
  void fold_amx() {
    const int n = s_.n, rows = rows_(), dim = kv_.dim;
    const int chunks = (n + kAmxKeys - 1) / kAmxKeys, padded = chunks * kAmxKeys;
    for (int d = 0; d < dim; ++d)  // zero keys past the tile's end: scores 0, P 0, V 0
      std::fill(s_.kst.begin() + (size_t)d * kTile + n, s_.kst.begin() + (size_t)d * kTile + padded, at::BFloat16(0.0f));
    std::fill(s_.vst.begin() + (size_t)n * dim, s_.vst.begin() + (size_t)padded * dim, at::BFloat16(0.0f));
    // VNNI packs, once per tile for every sub-tile: K chunk [dim/2][kAmxKeys][2], V chunk [kAmxKeys/2][dim][2].
    const uint16_t* kst = (const uint16_t*)s_.kst.data();
    const uint16_t* vst = (const uint16_t*)s_.vst.data();
    uint16_t* kpk = (uint16_t*)s_.kpack.data();
    uint16_t* vpk = (uint16_t*)s_.vpack.data();
    for (int c = 0; c < chunks; ++c) {
      uint16_t* kc = kpk + (size_t)c * kAmxKeys * dim;
      for (int d = 0; d < dim; d += 2)
        interleave_rows(kst + (size_t)d * kTile + c * kAmxKeys, kst + (size_t)(d + 1) * kTile + c * kAmxKeys,
                        kAmxKeys, kc + (size_t)d * kAmxKeys);
      uint16_t* vc = vpk + (size_t)c * kAmxKeys * dim;
      for (int j = 0; j < kAmxKeys; j += 2)
        interleave_rows(vst + (size_t)(c * kAmxKeys + j) * dim, vst + (size_t)(c * kAmxKeys + j + 1) * dim, dim,
                        vc + (size_t)j * dim);
    }
    bool ascending = true;
    for (int j = 1; j < n; ++j) ascending &= s_.kpos[j] > s_.kpos[j - 1];
    int kmin, kmax;
    key_extent(n, kmin, kmax);
    float* S = s_.scores.data();
    at::BFloat16* P = s_.pb.data();
    for (int r0 = 0; r0 < rows; r0 += kAmxRows) {
      const int rr = std::min(kAmxRows, rows - r0);
      const int first_pos = s_.rowpos[r0], last_pos = s_.rowpos[r0 + rr - 1];
      const int w = ascending ? (int)(std::upper_bound(s_.kpos.begin(), s_.kpos.begin() + n, last_pos) -
                                      s_.kpos.begin())
                              : n;
      if (w == 0) continue;
      const int wc = (w + kAmxKeys - 1) / kAmxKeys;
      for (int c = 0; c < wc; ++c)
        at::native::cpublas::brgemm(rr, kAmxKeys, dim, dim, kAmxKeys, kTile, false, s_.qb.data() + (size_t)r0 * dim,
                                    s_.kpack.data() + (size_t)c * kAmxKeys * dim, S + c * kAmxKeys, true);
      const bool every = all_visible(kmin, ascending ? s_.kpos[w - 1] : kmax, first_pos, last_pos);
      for (int i = 0; i < rr; ++i)
        softmax_row_bf16(r0 + i, S + (size_t)i * kTile, w, every, P + (size_t)i * kTile, wc * kAmxKeys);
      for (int c = 0; c < wc; ++c)
        at::native::cpublas::brgemm(rr, dim, kAmxKeys, kTile, dim, dim, true, P + c * kAmxKeys,
                                    s_.vpack.data() + (size_t)c * kAmxKeys * dim, s_.acc.data() + (size_t)r0 * dim,
                                    true);
    }
  }
#endif

  const KV<T>& kv_;
  Scratch& s_;
  const Request& rq_;
  const Item& it_;
  const int* table_;
  int kvh_;
  bool micro_, amx_, pairs_;
  float scale_;
  std::vector<uint8_t> member_;
};

struct IndexSlot {
  const int* ranges;  // [H, R, NR, 2]
  const int* cols;    // [H, R, NC]
  int blocks, nr, nc, block_q;
};

// Whether heads h0..h0+n-1 list the same ranges and columns for index block `blk`.
inline bool same_index_rows(const IndexSlot& sl, int h0, int n, int blk) {
  const int64_t rl = (int64_t)sl.nr * 2, cl = sl.nc;
  const int* r0 = sl.ranges + ((int64_t)h0 * sl.blocks + blk) * rl;
  const int* c0 = sl.cols + ((int64_t)h0 * sl.blocks + blk) * cl;
  for (int h = h0 + 1; h < h0 + n; ++h) {
    if (!std::equal(r0, r0 + rl, sl.ranges + ((int64_t)h * sl.blocks + blk) * rl)) return false;
    if (!std::equal(c0, c0 + cl, sl.cols + ((int64_t)h * sl.blocks + blk) * cl)) return false;
  }
  return true;
}

template <typename T>
void run_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                   const torch::Tensor& table, const std::vector<Request>& reqs,
                   const std::vector<IndexSlot>& slots, double scale, int64_t gather_below, bool allow_micro,
                   torch::Tensor& out) {
  KV<T> kv(key, value);
  const int heads = (int)query.size(1), dim = (int)query.size(2), kv_heads = (int)key.size(1);
  const int group = heads / kv_heads;
  const int64_t qt = query.stride(0), qh = query.stride(1);
  const int64_t ot = out.stride(0), oh = out.stride(1);
  const T* qd = query.data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int* tab = table.data_ptr<int>();
  const int64_t tab_stride = table.stride(0);
  const int threads = at::get_num_threads();

#ifdef FASTCTX_MICRO
  const bool micro = allow_micro && micro_dim(dim);
#else
  const bool micro = false;
#endif
#if defined(FASTCTX_MICRO) && defined(__AVX512BF16__)
  // bf16 on a CPU with bf16 dot products: oneDNN's brgemm (AMX tiles where present).
  const bool amx = micro && std::is_same<T, at::BFloat16>::value && at::native::cpublas::could_pack(at::kBFloat16);
#else
  const bool amx = false;
#endif
#ifdef FASTCTX_PAIRS
  const bool pairs = micro && std::is_same<T, at::BFloat16>::value;  // bf16 dot products for the micro-kernels
#else
  const bool pairs = false;
#endif
  const int group_rows = amx ? kAmxGroupRows : micro ? kMicroGroupRows : kGroupRows;
  if (micro) gather_below = std::min<int64_t>(gather_below, kMicroGatherBelow);
  // Items, with a cost estimate: query rows x keys read.
  std::vector<Item> items;
  int max_rows = std::max(group_rows, group);
  for (int b = 0; b < (int)reqs.size(); ++b) {
    const Request& r = reqs[b];
    if (r.mode == kSkip || r.q_len == 0) continue;
    if (r.mode == kIndex) {
      const IndexSlot& sl = slots[r.slot];
      const int block_rows = std::min(sl.block_q, r.q_len);
      max_rows = std::max(max_rows, block_rows * group);
      for (int t0 = 0; t0 < r.q_len; t0 += sl.block_q) {
        const int nt = std::min(sl.block_q, r.q_len - t0);
        const double cost = (double)nt * (r.position(t0 + nt - 1) + 1);
        const int blk = r.block0 + t0 / sl.block_q;
        for (int kvh = 0; kvh < kv_heads; ++kvh) {
          // The query heads of a KV head that read the same keys in this block (LServe selects per
          // KV head) are one item: their keys are read once for all of them.
          if (same_index_rows(sl, kvh * group, group, blk))
            items.push_back({b, kvh * group, group, t0, nt, 0, INT32_MAX, -1, 0, cost * group});
          else
            for (int h = kvh * group; h < (kvh + 1) * group; ++h)
              items.push_back({b, h, 1, t0, nt, 0, INT32_MAX, -1, 0, cost});
        }
      }
    } else {
      const int tb = std::max(1, group_rows / group);
      for (int kvh = 0; kvh < kv_heads; ++kvh)
        for (int t0 = 0; t0 < r.q_len; t0 += tb) {
          const int nt = std::min(tb, r.q_len - t0);
          int keys = r.position(t0 + nt - 1) + 1;
          if (r.mode == kWindow) keys = std::min(keys, r.sink + r.local + nt);
          items.push_back({b, kvh * group, group, t0, nt, 0, INT32_MAX, -1, 0, (double)nt * group * keys});
        }
    }
  }

  // Too few items for the threads (a few decodes): split long dense/window items along the keys.
  int64_t scratch_floats = 0;
  const int want = 4 * threads;
  if (!items.empty() && (int)items.size() < want) {
    std::vector<Item> split;
    const int per = (want + (int)items.size() - 1) / (int)items.size();
    for (const Item& it : items) {
      const Request& r = reqs[it.req];
      const int keys = r.position(it.tok0 + it.ntok - 1) + 1;
      const int parts = std::min(per, keys / kTile);
      if (parts < 2) {
        split.push_back(it);
        continue;
      }
      const int first = (int)split.size();
      const int step = ((keys + parts - 1) / parts + 15) / 16 * 16;
      for (int lo = 0; lo < keys; lo += step) {
        Item part = it;
        part.key_lo = lo;
        part.key_hi = std::min(keys, lo + step);
        part.group = first;
        part.scratch = scratch_floats;
        part.cost = it.cost * (part.key_hi - part.key_lo) / keys;
        scratch_floats += (int64_t)it.ntok * it.nheads * (dim + 2);
        split.push_back(part);
      }
    }
    items.swap(split);
  }
  std::vector<float> partial(scratch_floats);

  // Column panels: each index request's columns gathered once per head (see Panel).
  struct PanelJob { int req, head; };
  std::vector<PanelJob> jobs;
  for (int b = 0; b < (int)reqs.size(); ++b) {
    const Request& r = reqs[b];
    if (r.mode != kIndex || r.q_len == 0) continue;
    const IndexSlot& sl = slots[r.slot];
    bool any = false;
    const int nb = (r.q_len + sl.block_q - 1) / sl.block_q;
    for (int h = 0; h < heads && !any; ++h)
      for (int x = 0; x < nb * sl.nc && !any; ++x) any = sl.cols[((int64_t)h * sl.blocks + r.block0) * sl.nc + x] >= 0;
    if (any)
      for (int h = 0; h < heads; ++h) jobs.push_back({b, h});
  }
  std::vector<Panel> panels(reqs.size() * heads);
  std::vector<std::vector<float>> panel_k(jobs.size()), panel_v(jobs.size());
  const bool bf16_panels = pairs && !amx;  // (the AMX path stages panel keys from floats)
  std::vector<std::vector<at::BFloat16>> panel_kb(bf16_panels ? jobs.size() : 0), panel_vb(panel_kb.size());
  std::vector<std::vector<int>> panel_pos(jobs.size());
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (!jobs.empty())
  for (int64_t j = 0; j < (int64_t)jobs.size(); ++j) {
    const Request& r = reqs[jobs[j].req];
    const int h = jobs[j].head, kvh = h / group;
    const IndexSlot& sl = slots[r.slot];
    const int nb = (r.q_len + sl.block_q - 1) / sl.block_q;
    std::vector<uint8_t> seen(r.seq_len, 0);
    const int* cc = sl.cols + ((int64_t)h * sl.blocks + r.block0) * sl.nc;
    for (int x = 0; x < nb * sl.nc; ++x)
      if (cc[x] >= 0 && cc[x] < r.seq_len) seen[cc[x]] = 1;
    std::vector<int>& pos = panel_pos[j];
    for (int c = 0; c < r.seq_len; ++c)
      if (seen[c]) pos.push_back(c);
    const int n = (int)pos.size();
    if (n == 0) continue;
    const int* trow = tab + (int64_t)jobs[j].req * tab_stride;
    if constexpr (std::is_same<T, at::BFloat16>::value) {
      if (bf16_panels) {  // the cache's bf16 values as they are: K dims-major, V row-major
        std::vector<at::BFloat16>& pk = panel_kb[j];
        std::vector<at::BFloat16>& pv = panel_vb[j];
        pk.resize((size_t)n * dim);
        pv.resize((size_t)n * dim);
        for (int x = 0; x < n; ++x) {
          const int blk = trow[pos[x] / kv.block_size], tok = pos[x] % kv.block_size;
          const T* kr = kv.kp(blk, kvh, tok);
          const T* vr = kv.vp(blk, kvh, tok);
          for (int d = 0; d < dim; ++d) pk[(size_t)d * n + x] = kr[d * kv.kd];
          for (int d = 0; d < dim; ++d) pv[(size_t)x * dim + d] = vr[d * kv.vd];
        }
        panels[(size_t)jobs[j].req * heads + h] = {nullptr, nullptr, pos.data(), n, pk.data(), pv.data()};
        continue;
      }
    }
    std::vector<float>& pk = panel_k[j];
    std::vector<float>& pv = panel_v[j];
    pk.resize((size_t)n * dim);
    pv.resize((size_t)n * dim);
    std::vector<float> row(dim);
    for (int x = 0; x < n; ++x) {
      const int blk = trow[pos[x] / kv.block_size], tok = pos[x] % kv.block_size;
      kv.copy_k(blk, kvh, tok, 1, row.data());
      for (int d = 0; d < dim; ++d) pk[(size_t)d * n + x] = row[d];
      kv.copy_v(blk, kvh, tok, 1, pv.data() + (size_t)x * dim);
    }
    panels[(size_t)jobs[j].req * heads + h] = {pk.data(), pv.data(), pos.data(), n};
  }
  // Costliest first, so that the long items of a batch start early.
  std::vector<int> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = (int)i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return items[a].cost > items[b].cost; });
  const float sc = (float)scale;

#pragma omp parallel num_threads(threads)
  {
    static thread_local Scratch s;
    s.ensure(max_rows, micro ? kMicroRows : max_rows, dim, amx || pairs);
#pragma omp for schedule(dynamic, 1)
    for (int64_t o = 0; o < (int64_t)order.size(); ++o) {
      const Item& it = items[order[o]];
      const Request& r = reqs[it.req];
      const int kvh = it.head0 / group;
      const int* trow = tab + (int64_t)it.req * tab_stride;
      const int rows = it.ntok * it.nheads;
      for (int t = 0; t < it.ntok; ++t)
        for (int g = 0; g < it.nheads; ++g) {
          const int row = t * it.nheads + g;
          const T* src = qd + (int64_t)(r.q0 + it.tok0 + t) * qt + (int64_t)(it.head0 + g) * qh;
          const bool on_amx = amx && rows >= kAmxMinRows;
          if (on_amx || pairs) std::copy(src, src + dim, (T*)(s.qb.data() + (size_t)row * dim));
          if (!on_amx) {
            float* dst = s.q.data() + (size_t)row * dim;
            for (int d = 0; d < dim; ++d) dst[d] = to_f(src[d]) * sc;
          }
          s.rowpos[row] = r.position(it.tok0 + t);
        }
      std::fill(s.m.begin(), s.m.begin() + rows, kNegInf);
      std::fill(s.l.begin(), s.l.begin() + rows, 0.0f);
      std::fill(s.acc.begin(), s.acc.begin() + (size_t)rows * dim, 0.0f);
      s.segs.clear();
      s.n = 0;
      // AMX pays for packing a tile only across many query rows: decodes and short chunks take the
      // micro-kernels, reading the bf16 cache in place.
      ItemRunner<T> run(kv, s, r, it, trow, kvh, micro, amx && rows >= kAmxMinRows, pairs, sc);
      const int first_pos = s.rowpos[0], last_pos = s.rowpos[rows - 1];
      if (r.mode == kDense) {
        run.add_range(0, last_pos + 1, 0);
      } else if (r.mode == kWindow) {
        const int sink_end = std::min(r.sink, last_pos + 1);
        run.add_range(0, sink_end, 0);
        run.add_range(std::max(sink_end, first_pos - r.local + 1), last_pos + 1, 0);
      } else {
        const IndexSlot& sl = slots[r.slot];
        const int blk = r.block0 + it.tok0 / sl.block_q;
        const int* rr = sl.ranges + ((int64_t)it.head0 * sl.blocks + blk) * sl.nr * 2;
        for (int x = 0; x < sl.nr; ++x)
          run.add_range(std::max(rr[2 * x], 0), std::min(rr[2 * x + 1], last_pos + 1), (int)gather_below);
        const Panel& panel = panels[(size_t)it.req * heads + it.head0];
        if (panel.n) run.add_panel(panel, sl.cols + ((int64_t)it.head0 * sl.blocks + blk) * sl.nc, sl.nc, last_pos);
      }
      run.fold();
      if (it.group < 0) {
        for (int t = 0; t < it.ntok; ++t)
          for (int g = 0; g < it.nheads; ++g) {
            const int row = t * it.nheads + g;
            const float inv = s.l[row] > 0.0f ? 1.0f / s.l[row] : 0.0f;
            const float* ai = s.acc.data() + (size_t)row * dim;
            T* dst = od + (int64_t)(r.q0 + it.tok0 + t) * ot + (int64_t)(it.head0 + g) * oh;
            for (int d = 0; d < dim; ++d) dst[d] = static_cast<T>(ai[d] * inv);
          }
      } else {
        float* p = partial.data() + it.scratch;
        for (int row = 0; row < rows; ++row) {
          p[row] = s.m[row];
          p[rows + row] = s.l[row];
        }
        std::copy(s.acc.begin(), s.acc.begin() + (size_t)rows * dim, p + 2 * rows);
      }
    }
    if (amx) at::native::cpublas::brgemm_release(true);
  }

  // Merge split parts: softmax over the union = parts weighted by exp(m_part - m) / l.
  std::vector<int> groups;
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].group == (int)i) groups.push_back((int)i);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (!groups.empty())
  for (int64_t gi = 0; gi < (int64_t)groups.size(); ++gi) {
    const int first = groups[gi];
    const Item& head = items[first];
    const Request& r = reqs[head.req];
    const int rows = head.ntok * head.nheads;
    int end = first;
    while (end < (int)items.size() && items[end].group == first) ++end;
    std::vector<float> o(dim);
    for (int row = 0; row < rows; ++row) {
      float m = kNegInf;
      for (int x = first; x < end; ++x) m = std::max(m, partial[items[x].scratch + row]);
      float l = 0.0f;
      std::fill(o.begin(), o.end(), 0.0f);
      if (m != kNegInf)
        for (int x = first; x < end; ++x) {
          const float* p = partial.data() + items[x].scratch;
          const float w = std::exp(p[row] - m);
          l += p[rows + row] * w;
          const float* a = p + 2 * rows + (size_t)row * dim;
          for (int d = 0; d < dim; ++d) o[d] += a[d] * w;
        }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const int t = row / head.nheads, g = row % head.nheads;
      T* dst = od + (int64_t)(r.q0 + head.tok0 + t) * ot + (int64_t)(head.head0 + g) * oh;
      for (int d = 0; d < dim; ++d) dst[d] = static_cast<T>(o[d] * inv);
    }
  }
}

}  // namespace

// query [T, H, D] and out [T, H, D] (any token/head strides, dims contiguous);
// key/value logical [blocks, Hkv, block_size, D]; table [B, M] int32;
// requests: 8 ints per request (q0, q_len, seq_len, mode, sink, local, slot, block0), a plain list
// (building a tensor of them took ~3 us per call, a tenth of a decode step's attention call);
// positions [T] int32 or None; index slots: ranges [H, R, NR, 2], cols [H, R, NC] int32, block_q.
void paged_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor table,
                     std::vector<int> requests, c10::optional<torch::Tensor> positions,
                     std::vector<torch::Tensor> ranges,
                     std::vector<torch::Tensor> cols, std::vector<int64_t> block_q, double scale,
                     int64_t gather_below, bool allow_micro, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && key.dim() == 4 && value.dim() == 4, "paged_attention: ranks");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type() &&
              out.scalar_type() == query.scalar_type(), "paged_attention: one dtype for q, k, v, out");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "paged_attention: head_dim must be contiguous");
  const int64_t batch = (int64_t)requests.size() / 8;
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && (int64_t)requests.size() == batch * 8,
              "paged_attention: int32 table, 8 ints per request");
  TORCH_CHECK(table.size(0) >= batch && (table.size(0) == 0 || table.stride(1) == 1),
              "paged_attention: one block table row per request");
  TORCH_CHECK(ranges.size() == cols.size() && cols.size() == block_q.size(), "paged_attention: index slots");
  const int heads = (int)query.size(1);
  TORCH_CHECK(heads % key.size(1) == 0 && key.size(3) == query.size(2), "paged_attention: head counts / head_dim");
  const bool has_pos = positions.has_value();
  TORCH_CHECK(!has_pos || (positions->scalar_type() == torch::kInt32 && positions->is_contiguous() &&
                           positions->numel() == query.size(0)), "paged_attention: positions [T] int32");
  std::vector<IndexSlot> slots;
  for (size_t s = 0; s < ranges.size(); ++s) {
    TORCH_CHECK(ranges[s].scalar_type() == torch::kInt32 && ranges[s].is_contiguous() && ranges[s].dim() == 4 &&
                ranges[s].size(0) == heads && ranges[s].size(3) == 2, "paged_attention: ranges [H, R, NR, 2]");
    TORCH_CHECK(cols[s].scalar_type() == torch::kInt32 && cols[s].is_contiguous() && cols[s].dim() == 3 &&
                cols[s].size(0) == heads && cols[s].size(1) == ranges[s].size(1), "paged_attention: cols [H, R, NC]");
    slots.push_back({ranges[s].data_ptr<int>(), cols[s].data_ptr<int>(), (int)ranges[s].size(1),
                     (int)ranges[s].size(2), (int)cols[s].size(2), (int)block_q[s]});
  }
  const int* rq = requests.data();
  const int* pos = has_pos ? positions->data_ptr<int>() : nullptr;
  std::vector<Request> reqs;
  for (int64_t b = 0; b < batch; ++b) {
    const int* x = rq + b * 8;
    Request r{x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], pos ? pos + x[0] : nullptr};
    TORCH_CHECK(r.mode != kIndex || (r.slot >= 0 && r.slot < (int)slots.size()), "paged_attention: index slot");
    TORCH_CHECK(r.mode != kIndex || (r.block0 >= 0 && r.block0 + (r.q_len + slots[r.slot].block_q - 1) /
                slots[r.slot].block_q <= slots[r.slot].blocks), "paged_attention: index blocks out of range");
    TORCH_CHECK(r.q0 >= 0 && r.q0 + r.q_len <= query.size(0), "paged_attention: query rows out of range");
    reqs.push_back(r);
  }
  switch (query.scalar_type()) {
    case torch::kFloat32:
      run_attention<float>(query, key, value, table, reqs, slots, scale, gather_below, allow_micro, out);
      break;
    case torch::kBFloat16:
      run_attention<at::BFloat16>(query, key, value, table, reqs, slots, scale, gather_below, allow_micro, out);
      break;
    case torch::kFloat16:
      run_attention<at::Half>(query, key, value, table, reqs, slots, scale, gather_below, allow_micro, out);
      break;
    default:
      TORCH_CHECK(false, "paged_attention: float32, bfloat16 or float16");
  }
}

namespace {

// Scores of `rows` packed queries against keys [0, width) of one KV head, into S [rows, ld].
template <typename T>
void score_keys(const KV<T>& kv, const int* trow, int kvh, const float* q, int rows, int width, float* S,
                int ld, std::vector<float>& buf) {
  const int bs = kv.block_size, dim = kv.dim;
  for (int start = 0; start < width;) {
    const int blk = trow[start / bs], tok = start % bs, len = std::min(width - start, bs - tok);
    if (kv.k_rows()) {
      gemm_abt(rows, len, dim, 1.0f, q, dim, (const float*)kv.kp(blk, kvh, tok), (int)kv.kt, 0.0f, S + start, ld);
    } else if (kv.k_cols()) {
      gemm_ab(rows, len, dim, 1.0f, q, dim, (const float*)kv.kp(blk, kvh, tok), (int)kv.kd, 0.0f, S + start, ld);
    } else {
      buf.resize((size_t)len * dim);
      kv.copy_k(blk, kvh, tok, len, buf.data());
      gemm_abt(rows, len, dim, 1.0f, q, dim, buf.data(), dim, 0.0f, S + start, ld);
    }
    start += len;
  }
}

template <typename T>
void run_last_query_sums(const torch::Tensor& q, const KV<T>& kv, const int* trow, int tk, const int* kv_head_of,
                         double scale, float* vd, float* sd) {
  const int heads = (int)q.size(0), n = (int)q.size(1), dim = (int)q.size(2);
  const float* qd = q.data_ptr<float>();
  const int last = tk - 1;  // position of the last query
  const float sc = (float)scale;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores((size_t)kEstRows * tk), by_shift(tk), qs((size_t)kEstRows * dim), buf;
#pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < heads; ++h) {
      float* vert = vd + (size_t)h * tk;
      // by_shift[u] collects offset last - u: row p adds its key j at u = j + (last - p),
      // so every row's update is one contiguous, vectorizable run.
      std::fill(by_shift.begin(), by_shift.end(), 0.0f);
      for (int r0 = 0; r0 < n; r0 += kEstRows) {
        const int rows = std::min(kEstRows, n - r0);
        const int width = tk - n + r0 + rows;  // keys visible to the tile's last row
        for (int i = 0; i < rows * dim; ++i) qs[i] = qd[((size_t)h * n + r0) * dim + i] * sc;
        score_keys(kv, trow, kv_head_of[h], qs.data(), rows, width, scores.data(), width, buf);
        for (int i = 0; i < rows; ++i) {
          const int p = tk - n + r0 + i;  // this query's position
          const int len = p + 1;
          float* si = scores.data() + (size_t)i * width;
          const float inv = 1.0f / exp_shift_sum(si, len, row_max(si, len));
          float* shifted = by_shift.data() + (last - p);
          for (int j = 0; j < len; ++j) {
            const float pr = si[j] * inv;
            vert[j] += pr;
            shifted[j] += pr;
          }
        }
      }
      float* sl = sd + (size_t)h * tk;
      for (int o = 0; o < tk; ++o) sl[o] = by_shift[last - o];
    }
  }
}

// Mean of each run of `pool` keys (the last run over its real keys), out [Hkv, P, D].
template <typename T>
void run_pooled_keys(const KV<T>& kv, int kv_heads, const int* trow, int tk, int pool, float* out) {
  const int dim = kv.dim, bs = kv.block_size, pools = (tk + pool - 1) / pool;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t hp = 0; hp < (int64_t)kv_heads * pools; ++hp) {
    const int h = (int)(hp / pools), p = (int)(hp % pools);
    const int start = p * pool, end = std::min(tk, start + pool);
    float* o = out + (size_t)hp * dim;
    std::fill(o, o + dim, 0.0f);
    for (int t = start; t < end; ++t) {
      const T* k = kv.kp(trow[t / bs], h, t % bs);
      for (int d = 0; d < dim; ++d) o[d] += to_f(k[d * kv.kd]);
    }
    const float inv = 1.0f / (end - start);
    for (int d = 0; d < dim; ++d) o[d] *= inv;
  }
}

}  // namespace

// Attention of a chunk's last n queries (they end at key tk - 1) over every key,
// reduced on the fly to what index estimators read: the mass on each key column
// and on each diagonal offset (query position - key position). The [H, n, Tk]
// probabilities are never stored. q [H, n, D] float32; kv_head_of [H] int32.
std::vector<torch::Tensor> last_query_sums(torch::Tensor q, torch::Tensor key, torch::Tensor table_row,
                                           int64_t tk, torch::Tensor kv_head_of, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3, "last_query_sums: q [H, n, D] float32");
  TORCH_CHECK(key.dim() == 4 && key.size(3) == q.size(2), "last_query_sums: key [blocks, Hkv, bs, D]");
  TORCH_CHECK(table_row.scalar_type() == torch::kInt32 && table_row.is_contiguous(), "last_query_sums: int32 table row");
  TORCH_CHECK(kv_head_of.scalar_type() == torch::kInt32 && kv_head_of.numel() == q.size(0), "last_query_sums: kv_head_of [H]");
  const int n = (int)q.size(1);
  TORCH_CHECK(n >= 1 && n <= tk && table_row.numel() * key.size(2) >= tk, "last_query_sums: bad lengths");
  auto vertical = torch::zeros({q.size(0), tk}, q.options());
  auto slash = torch::zeros({q.size(0), tk}, q.options());
  const int* trow = table_row.data_ptr<int>();
  const int* kvh = kv_head_of.data_ptr<int>();
  switch (key.scalar_type()) {
    case torch::kFloat32:
      run_last_query_sums<float>(q, KV<float>(key, key), trow, (int)tk, kvh, scale, vertical.data_ptr<float>(), slash.data_ptr<float>());
      break;
    case torch::kBFloat16:
      run_last_query_sums<at::BFloat16>(q, KV<at::BFloat16>(key, key), trow, (int)tk, kvh, scale,
                                        vertical.data_ptr<float>(), slash.data_ptr<float>());
      break;
    case torch::kFloat16:
      run_last_query_sums<at::Half>(q, KV<at::Half>(key, key), trow, (int)tk, kvh, scale, vertical.data_ptr<float>(),
                                    slash.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "last_query_sums: float32, bfloat16 or float16 keys");
  }
  return {vertical, slash};
}

// Mean-pooled keys of one sequence: [Hkv, ceil(tk / pool), D] float32.
torch::Tensor pooled_keys(torch::Tensor key, torch::Tensor table_row, int64_t tk, int64_t pool) {
  TORCH_CHECK(key.dim() == 4 && pool >= 1, "pooled_keys: key [blocks, Hkv, bs, D], pool >= 1");
  TORCH_CHECK(table_row.scalar_type() == torch::kInt32 && table_row.is_contiguous() &&
              table_row.numel() * key.size(2) >= tk, "pooled_keys: int32 table row covering tk");
  const int kv_heads = (int)key.size(1);
  auto out = torch::empty({kv_heads, (tk + pool - 1) / pool, key.size(3)}, key.options().dtype(torch::kFloat32));
  const int* trow = table_row.data_ptr<int>();
  switch (key.scalar_type()) {
    case torch::kFloat32:
      run_pooled_keys<float>(KV<float>(key, key), kv_heads, trow, (int)tk, (int)pool, out.data_ptr<float>());
      break;
    case torch::kBFloat16:
      run_pooled_keys<at::BFloat16>(KV<at::BFloat16>(key, key), kv_heads, trow, (int)tk, (int)pool, out.data_ptr<float>());
      break;
    case torch::kFloat16:
      run_pooled_keys<at::Half>(KV<at::Half>(key, key), kv_heads, trow, (int)tk, (int)pool, out.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "pooled_keys: float32, bfloat16 or float16 keys");
  }
  return out;
}

// Which inner path paged_attention takes for this dtype and head_dim on this build: "amx"
// (bf16 through oneDNN brgemm on AMX tiles), "micro" (AVX-512 register micro-kernels, fp32
// compute) or "sgemm" (MKL sgemm tiles, any x86-64).
std::string kernel_path(torch::ScalarType dtype, int64_t dim, bool allow_micro) {
#ifdef FASTCTX_MICRO
  const bool micro = allow_micro && micro_dim((int)dim);
#else
  const bool micro = false;
  (void)dim;
  (void)allow_micro;
#endif
#if defined(FASTCTX_MICRO) && defined(__AVX512BF16__)
  if (micro && dtype == torch::kBFloat16 && at::native::cpublas::could_pack(at::kBFloat16)) return "amx";
#else
  (void)dtype;
#endif
  return micro ? "micro" : "sgemm";
}

void register_lserve(pybind11::module& m);  // lserve_cpu.cpp
void register_mamba(pybind11::module& m);   // mamba_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_lserve(m);
  register_mamba(m);
  m.def("kernel_path", &kernel_path, "the inner path paged_attention takes for a dtype and head_dim");
  m.def("paged_attention", &paged_attention, "causal attention over a paged KV cache, dense/window/index per request (CPU)");
  m.def("last_query_sums", &last_query_sums, "column and diagonal attention mass of a chunk's last queries (CPU)");
  m.def("pooled_keys", &pooled_keys, "mean-pooled keys of one sequence (CPU)");
}
