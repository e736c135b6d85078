// LServe's decode-time page selection on CPU, one call per step of a (request, layer): a decode
// step costs tens of microseconds of attention at a 4K-token budget, so the selection around it
// must not be a chain of small tensor ops.
//
//   lserve_extend  - per-logical-page key min/max of new keys, read from the paged cache in place;
//   lserve_select  - each dense KV head's best physical pages within the budget, newest last;
//   lserve_ranges  - the key ranges every query head reads (dense: merged pages, streaming: sinks
//                    and the local window);
//   range_pairs    - (query, key) pairs a set of ranges gives consecutive queries.
// The PyTorch reference of each is in fastctx/kernels/lserve.py.

#include <torch/extension.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

constexpr int32_t kEmpty = std::numeric_limits<int32_t>::max();  // an unused range slot (start = end)
constexpr int32_t kOpenEnd = kEmpty - 1;                         // a range that runs past the context
constexpr int kSpan = 64;  // logical pages per span of the bounds (fastctx/kernels/lserve.py: SPAN)

template <typename T>
void extend_bounds(const torch::Tensor& key, const int* table, int64_t start, int64_t end, int logical,
                   T* kmin, T* kmax, int64_t spans) {
  const int kv_heads = (int)key.size(1), bs = (int)key.size(2), dim = (int)key.size(3);
  const int64_t sb = key.stride(0), sh = key.stride(1), st = key.stride(2), sd = key.stride(3);
  const T* k = key.data_ptr<T>();
  const int64_t first = start / logical, last = (end + logical - 1) / logical;
  at::parallel_for(0, kv_heads * (last - first), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> mn(dim), mx(dim);
    for (int64_t x = lo; x < hi; ++x) {
      const int h = (int)(x / (last - first));
      const int64_t page = first + x % (last - first);
      std::fill(mn.begin(), mn.end(), std::numeric_limits<float>::infinity());
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = page * logical; t < std::min<int64_t>((page + 1) * logical, end); ++t) {
        const T* row = k + table[t / bs] * sb + h * sh + (t % bs) * st;
        for (int d = 0; d < dim; ++d) {
          const float v = static_cast<float>(row[d * sd]);
          mn[d] = std::min(mn[d], v);
          mx[d] = std::max(mx[d], v);
        }
      }
      for (int d = 0; d < dim; ++d) {
        const int64_t at = (((int64_t)h * spans + page / kSpan) * dim + d) * kSpan + page % kSpan;
        kmin[at] = static_cast<T>(mn[d]);
        kmax[at] = static_cast<T>(mx[d]);
      }
    }
  });
}

// Writes the bounds of logical pages start/logical .. ceil(end/logical) of one sequence into
// kmin/kmax [Hkv, spans, D, kSpan]: spans of kSpan pages, dims-major inside a span (the keys' dtype:
// each bound is one of the keys, so exact).
void lserve_extend(torch::Tensor key, torch::Tensor table_row, int64_t start, int64_t end, int64_t logical,
                   torch::Tensor kmin, torch::Tensor kmax) {
  TORCH_CHECK(key.dim() == 4 && kmin.dim() == 4 && kmin.size(3) == kSpan && kmin.is_contiguous() &&
              kmax.is_contiguous(), "lserve_extend: key [blocks, Hkv, bs, D], bounds [Hkv, spans, D, 64] contiguous");
  TORCH_CHECK(kmin.scalar_type() == key.scalar_type() && kmax.scalar_type() == key.scalar_type(),
              "lserve_extend: bounds must have the keys' dtype");
  TORCH_CHECK(kmin.size(2) == key.size(3) && (end + logical - 1) / logical <= kmin.size(1) * kSpan,
              "lserve_extend: bounds too small");
  auto table = table_row.to(torch::kInt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "lserve_extend", [&] {
    extend_bounds<scalar_t>(key, table.data_ptr<int>(), start, end, (int)logical, kmin.data_ptr<scalar_t>(),
                            kmax.data_ptr<scalar_t>(), kmin.size(1));
  });
}

// Scores of the logical pages of one span of one KV head, each the max over the head's query heads
// of sum_d max(q_d kmin_d, q_d kmax_d) = relu(q) . kmax + min(q, 0) . kmin (qpos, qneg: [group][dim];
// kmin, kmax: the span's [dim][kSpan]). Dims-major spans put pages in vector lanes (no horizontal
// sums) and are contiguous, so selection streams the bounds; kSpan pages by up to kQueries query heads
// are kSpan / 16 * kQueries independent accumulators, enough to hide the FMA latency. Only the first
// `n` pages are read.
constexpr int kQueries = 4;

template <typename T>
void logical_scores(const float* qpos, const float* qneg, int group, int dim, const T* kmin, const T* kmax,
                    int n, float* out) {
  for (int j = 0; j < kSpan; ++j) out[j] = -std::numeric_limits<float>::infinity();
  for (int g0 = 0; g0 < group; g0 += kQueries) {
    const int ng = std::min(kQueries, group - g0);
    float acc[kQueries][kSpan] = {};
    for (int d = 0; d < dim; ++d) {
      const T* hi = kmax + d * kSpan;
      const T* lo = kmin + d * kSpan;
      float h[kSpan], w[kSpan];
      for (int j = 0; j < kSpan; ++j) {
        h[j] = j < n ? static_cast<float>(hi[j]) : 0.0f;
        w[j] = j < n ? static_cast<float>(lo[j]) : 0.0f;
      }
      for (int g = 0; g < ng; ++g) {
        const float qp = qpos[(int64_t)(g0 + g) * dim + d], qn = qneg[(int64_t)(g0 + g) * dim + d];
#pragma omp simd
        for (int j = 0; j < kSpan; ++j) acc[g][j] += qp * h[j] + qn * w[j];
      }
    }
    for (int g = 0; g < ng; ++g)
      for (int j = 0; j < n; ++j) out[j] = std::max(out[j], acc[g][j]);
  }
}

#ifdef __AVX512F__
// 16 bounds as floats, widened on load (bf16: the top half of a float; fp16: vcvtph2ps).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// logical_scores in registers: 4 x 16 pages by up to kQueries query heads, the next span prefetched.
template <typename T>
void logical_scores_avx512(const float* qpos, const float* qneg, int group, int dim, const T* kmin, const T* kmax,
                           int n, float* out, bool prefetch_next) {
  constexpr int V = kSpan / 16;
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) {
    const int left = n - 16 * v;
    mask[v] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
  }
  __m512 best[V];
  for (int v = 0; v < V; ++v) best[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int g0 = 0; g0 < group; g0 += kQueries) {
    const int ng = std::min(kQueries, group - g0);
    __m512 acc[kQueries][V];
    for (int g = 0; g < kQueries; ++g)
      for (int v = 0; v < V; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int d = 0; d < dim; ++d) {
      const T* hi = kmax + d * kSpan;
      const T* lo = kmin + d * kSpan;
      if (prefetch_next && g0 == 0)
        for (int b = 0; b < kSpan * (int)sizeof(T); b += 64) {
          _mm_prefetch((const char*)(hi + dim * kSpan) + b, _MM_HINT_T0);
          _mm_prefetch((const char*)(lo + dim * kSpan) + b, _MM_HINT_T0);
        }
      __m512 h[V], w[V];
      for (int v = 0; v < V; ++v) h[v] = load16(hi + 16 * v, mask[v]), w[v] = load16(lo + 16 * v, mask[v]);
      for (int g = 0; g < ng; ++g) {
        const __m512 qp = _mm512_set1_ps(qpos[(int64_t)(g0 + g) * dim + d]);
        const __m512 qn = _mm512_set1_ps(qneg[(int64_t)(g0 + g) * dim + d]);
        for (int v = 0; v < V; ++v) acc[g][v] = _mm512_fmadd_ps(qn, w[v], _mm512_fmadd_ps(qp, h[v], acc[g][v]));
      }
    }
    for (int g = 0; g < ng; ++g)
      for (int v = 0; v < V; ++v) best[v] = _mm512_max_ps(best[v], acc[g][v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + 16 * v, best[v]);
}
#endif

// [dense KV heads, K] int32 ascending physical page ids: the budget_pages - 1 best by the max of
// their logical pages' scores, plus the newest page; every page when they fit.
torch::Tensor lserve_select(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax, int64_t logical_pages,
                            torch::Tensor streaming, int64_t logical, int64_t page_size, int64_t budget_pages) {
  TORCH_CHECK(kmin.dim() == 4 && kmin.size(3) == kSpan && kmin.is_contiguous() && kmax.is_contiguous() &&
              kmin.sizes() == kmax.sizes(), "lserve_select: bounds [Hkv, spans, D, 64] contiguous");
  const int kv_heads = (int)kmin.size(0), dim = (int)kmin.size(2), group = (int)(q.size(0) / kv_heads);
  const int64_t span_cap = kmin.size(1), per = page_size / logical;
  const int64_t pages = (logical_pages + per - 1) / per;
  auto qf = q.to(torch::kFloat).contiguous();
  auto stream = streaming.to(torch::kBool).contiguous();
  std::vector<int> dense;
  for (int h = 0; h < kv_heads; ++h)
    if (!stream.data_ptr<bool>()[h]) dense.push_back(h);
  const int64_t k = std::min(pages, budget_pages), nd = (int64_t)dense.size();
  auto out = torch::empty({nd, k}, torch::kInt);
  int* o = out.data_ptr<int>();
  if (pages <= budget_pages) {
    for (int64_t x = 0; x < nd; ++x) std::iota(o + x * k, o + (x + 1) * k, 0);
    return out;
  }
  std::vector<float> qpos(q.numel()), qneg(q.numel());
  const float* qd = qf.data_ptr<float>();
  for (int64_t i = 0; i < q.numel(); ++i) qpos[i] = std::max(qd[i], 0.0f), qneg[i] = std::min(qd[i], 0.0f);
  // Logical pages of the older physical pages, in spans split evenly over the threads.
  const int64_t older = (pages - 1) * per, spans = (older + kSpan - 1) / kSpan;
  const int64_t padded = spans * kSpan;
  std::vector<float> scores(nd * padded);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kmin.scalar_type(), "lserve_select", [&] {
    const scalar_t* lo = kmin.data_ptr<scalar_t>();
    const scalar_t* hi = kmax.data_ptr<scalar_t>();
    at::parallel_for(0, nd * spans, 4, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t x = i / spans, l0 = (i % spans) * kSpan;
        const int h = dense[x];
        const int64_t off = ((int64_t)h * span_cap + i % spans) * dim * kSpan;
        const float* qp = qpos.data() + (int64_t)h * group * dim;
        const float* qn = qneg.data() + (int64_t)h * group * dim;
        const int n = (int)std::min<int64_t>(kSpan, older - l0);
        float* sc = scores.data() + x * padded + l0;
#ifdef __AVX512F__
        if constexpr (!std::is_same<scalar_t, double>::value) {
          logical_scores_avx512(qp, qn, group, dim, lo + off, hi + off, n, sc, i + 1 < b && n == kSpan);
          continue;
        }
#endif
        logical_scores(qp, qn, group, dim, lo + off, hi + off, n, sc);
      }
    });
  });
  // A physical page scores the max of its logical pages; the best budget_pages - 1 of the older
  // pages (ties to the earlier page), then the newest.
  std::vector<float> physical(pages - 1);
  std::vector<int> ids(pages - 1);
  for (int64_t x = 0; x < nd; ++x) {
    const float* sc = scores.data() + x * padded;
    for (int64_t p = 0; p < pages - 1; ++p) physical[p] = *std::max_element(sc + p * per, sc + (p + 1) * per);
    std::iota(ids.begin(), ids.end(), 0);
    auto better = [&](int a, int b) { return physical[a] > physical[b] || (physical[a] == physical[b] && a < b); };
    std::nth_element(ids.begin(), ids.begin() + (k - 1), ids.end(), better);
    std::sort(ids.begin(), ids.begin() + (k - 1));
    int* row = o + x * k;
    std::copy(ids.begin(), ids.begin() + (k - 1), row);
    row[k - 1] = (int)(pages - 1);
  }
  return out;
}

// [H, NR, 2] int32 ranges per query head: a dense KV head's query heads read its pages (adjacent
// pages merged, each range ending at its page's end), a streaming one's read the sinks and
// everything from local_start on; unused slots empty and last.
torch::Tensor lserve_ranges(torch::Tensor pages, torch::Tensor streaming, int64_t group, int64_t page_size,
                            int64_t sink, int64_t local_start) {
  auto stream = streaming.to(torch::kBool).contiguous();
  auto pg = pages.to(torch::kInt).contiguous();
  const int kv_heads = (int)stream.size(0);
  const int64_t k = pg.size(1);
  std::vector<std::vector<std::pair<int, int>>> runs(kv_heads);
  int64_t slots = 2;
  for (int h = 0, x = 0; h < kv_heads; ++h) {
    auto& r = runs[h];
    if (stream.data_ptr<bool>()[h]) {
      r.push_back({0, (int)std::min(sink, local_start)});
      r.push_back({(int)local_start, kOpenEnd});
      continue;
    }
    const int* row = pg.data_ptr<int>() + (x++) * k;
    for (int64_t j = 0; j < k; ++j) {
      const int s = (int)(row[j] * page_size), e = (int)((row[j] + 1) * page_size);
      if (!r.empty() && r.back().second == s) r.back().second = e;
      else r.push_back({s, e});
    }
    slots = std::max<int64_t>(slots, (int64_t)r.size());
  }
  auto out = torch::full({kv_heads * group, slots, 2}, kEmpty, torch::kInt);
  int* o = out.data_ptr<int>();
  for (int h = 0; h < kv_heads; ++h)
    for (int g = 0; g < group; ++g)
      for (size_t j = 0; j < runs[h].size(); ++j) {
        int* slot = o + (((int64_t)h * group + g) * slots + (int64_t)j) * 2;
        slot[0] = runs[h][j].first;
        slot[1] = runs[h][j].second;
      }
  return out;
}

// Sum over heads and ranges of the keys the ranges give `count` queries at positions
// first_pos, first_pos + 1, ... (causal): a decode's read pairs, counted every layer.
int64_t range_pairs(torch::Tensor ranges, int64_t first_pos, int64_t count) {
  auto r = ranges.to(torch::kInt).contiguous();
  const int* rr = r.data_ptr<int>();
  int64_t total = 0;
  for (int64_t i = 0; i < r.numel() / 2; ++i)
    for (int64_t p = first_pos; p < first_pos + count; ++p) {
      const int64_t start = std::max<int64_t>(rr[2 * i], 0), end = std::min<int64_t>(rr[2 * i + 1], p + 1);
      total += std::max<int64_t>(end - start, 0);
    }
  return total;
}

}  // namespace

void register_lserve(pybind11::module& m) {
  m.def("lserve_extend", &lserve_extend, "LServe: per-logical-page key min/max from the paged cache (CPU)");
  m.def("lserve_select", &lserve_select, "LServe: each dense KV head's best pages within the budget (CPU)");
  m.def("lserve_ranges", &lserve_ranges, "LServe: key ranges per query head from pages and streaming heads");
  m.def("range_pairs", &range_pairs, "(query, key) pairs that key ranges give consecutive queries");
}
