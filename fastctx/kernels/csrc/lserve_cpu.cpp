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

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int32_t kEmpty = std::numeric_limits<int32_t>::max();  // an unused range slot (start = end)
constexpr int32_t kOpenEnd = kEmpty - 1;                         // a range that runs past the context

template <typename T>
void extend_bounds(const torch::Tensor& key, const int* table, int64_t start, int64_t end, int logical,
                   T* kmin, T* kmax, int64_t cap) {
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
      T* omin = kmin + ((int64_t)h * cap + page) * dim;
      T* omax = kmax + ((int64_t)h * cap + page) * dim;
      for (int d = 0; d < dim; ++d) omin[d] = static_cast<T>(mn[d]), omax[d] = static_cast<T>(mx[d]);
    }
  });
}

// Writes the bounds of logical pages start/logical .. ceil(end/logical) of one sequence into
// kmin/kmax [Hkv, cap, D] (the keys' dtype: each bound is one of the keys, so exact).
void lserve_extend(torch::Tensor key, torch::Tensor table_row, int64_t start, int64_t end, int64_t logical,
                   torch::Tensor kmin, torch::Tensor kmax) {
  TORCH_CHECK(key.dim() == 4 && kmin.dim() == 3 && kmin.is_contiguous() && kmax.is_contiguous(),
              "lserve_extend: key [blocks, Hkv, bs, D], bounds [Hkv, cap, D] contiguous");
  TORCH_CHECK(kmin.scalar_type() == key.scalar_type() && kmax.scalar_type() == key.scalar_type(),
              "lserve_extend: bounds must have the keys' dtype");
  TORCH_CHECK((end + logical - 1) / logical <= kmin.size(1), "lserve_extend: bounds too small");
  auto table = table_row.to(torch::kInt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "lserve_extend", [&] {
    extend_bounds<scalar_t>(key, table.data_ptr<int>(), start, end, (int)logical, kmin.data_ptr<scalar_t>(),
                            kmax.data_ptr<scalar_t>(), kmin.size(1));
  });
}

// Score of physical page p: the max over its logical pages l0..l1 and over a KV head's query
// heads of sum_d max(q_d kmin_ld, q_d kmax_ld) = relu(q) . kmax_l + min(q, 0) . kmin_l
// (qpos, qneg: [group][dim]).
template <typename T>
float physical_score(const float* qpos, const float* qneg, int group, int dim, const T* kmin, const T* kmax,
                     int64_t l0, int64_t l1) {
  float best = -std::numeric_limits<float>::infinity();
  float lo[256], hi[256];  // head_dim <= 256
  for (int64_t l = l0; l < l1; ++l) {
    for (int d = 0; d < dim; ++d) lo[d] = static_cast<float>(kmin[l * dim + d]), hi[d] = static_cast<float>(kmax[l * dim + d]);
    for (int g = 0; g < group; ++g) {
      const float* qp = qpos + g * dim;
      const float* qn = qneg + g * dim;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < dim; ++d) s += qp[d] * hi[d] + qn[d] * lo[d];
      best = std::max(best, s);
    }
  }
  return best;
}

// [dense KV heads, K] int32 ascending physical page ids: the budget_pages - 1 best by the max of
// their logical pages' scores, plus the newest page; every page when they fit.
torch::Tensor lserve_select(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax, int64_t logical_pages,
                            torch::Tensor streaming, int64_t logical, int64_t page_size, int64_t budget_pages) {
  const int kv_heads = (int)kmin.size(0), dim = (int)kmin.size(2), group = (int)(q.size(0) / kv_heads);
  TORCH_CHECK(dim <= 256, "lserve_select: head_dim up to 256");
  const int64_t cap = kmin.size(1), per = page_size / logical;
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
  // Every older page of every dense head, split evenly over the threads.
  std::vector<float> physical(nd * pages);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kmin.scalar_type(), "lserve_select", [&] {
    const scalar_t* lo = kmin.data_ptr<scalar_t>();
    const scalar_t* hi = kmax.data_ptr<scalar_t>();
    at::parallel_for(0, nd * (pages - 1), 64, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t x = i / (pages - 1), p = i % (pages - 1);
        const int h = dense[x];
        const int64_t off = (int64_t)h * cap * dim;
        physical[x * pages + p] = physical_score(qpos.data() + (int64_t)h * group * dim, qneg.data() + (int64_t)h * group * dim,
                                                 group, dim, lo + off, hi + off, p * per,
                                                 std::min(logical_pages, (p + 1) * per));
      }
    });
  });
  // The best budget_pages - 1 of the older pages (ties to the earlier page), then the newest.
  std::vector<int> ids(pages - 1);
  for (int64_t x = 0; x < nd; ++x) {
    const float* sc = physical.data() + x * pages;
    std::iota(ids.begin(), ids.end(), 0);
    auto better = [&](int a, int b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a < b); };
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
