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
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int kTile = 256;     // keys per score tile
constexpr int kGroupRows = 128;  // packed query rows (tokens x heads) per grouped item
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

// One tile of up to kTile keys: positions, and where to score them from.
struct Segment {
  int col0, len;
  int blk, tok;  // physical block and first token, for keys read in place
  bool in_place;
};

struct Scratch {
  std::vector<float> q, scores, acc, m, l, kbuf, vbuf;
  std::vector<int> rowpos, kpos;
  std::vector<Segment> segs;
  int n = 0;  // keys in the current tile
  Scratch(int rows, int dim)
      : q((size_t)rows * dim), scores((size_t)rows * kTile), acc((size_t)rows * dim), m(rows), l(rows),
        kbuf((size_t)kTile * dim), vbuf((size_t)kTile * dim), rowpos(rows), kpos(kTile) {}
};

template <typename T>
class ItemRunner {
 public:
  ItemRunner(const KV<T>& kv, Scratch& s, const Request& rq, const Item& it, const int* table, int kvh)
      : kv_(kv), s_(s), rq_(rq), it_(it), table_(table), kvh_(kvh) {}

  // Adds keys [start, end) (positions), split at block and tile boundaries.
  void add_range(int start, int end, int gather_below) {
    start = std::max(start, it_.key_lo);
    end = std::min(end, it_.key_hi);
    if (end <= start) return;
    if (end - start < gather_below) {
      for (int c = start; c < end; ++c) add_column(c);
      return;
    }
    const int bs = kv_.block_size;
    while (start < end) {
      if (s_.n == kTile) fold();
      const int blk = table_[start / bs], tok = start % bs;
      const int len = std::min({end - start, bs - tok, kTile - s_.n});
      const bool in_place = kv_.k_rows() || kv_.k_cols();
      if (in_place) {
        s_.segs.push_back({s_.n, len, blk, tok, true});
      } else {
        kv_.copy_k(blk, kvh_, tok, len, s_.kbuf.data() + (size_t)s_.n * kv_.dim);
        kv_.copy_v(blk, kvh_, tok, len, s_.vbuf.data() + (size_t)s_.n * kv_.dim);
        push_buffered(len);
      }
      for (int j = 0; j < len; ++j) s_.kpos[s_.n + j] = start + j;
      s_.n += len;
      start += len;
    }
  }

  void add_column(int c) {
    if (c < it_.key_lo || c >= it_.key_hi) return;
    if (s_.n == kTile) fold();
    const int bs = kv_.block_size;
    const int blk = table_[c / bs], tok = c % bs;
    kv_.copy_k(blk, kvh_, tok, 1, s_.kbuf.data() + (size_t)s_.n * kv_.dim);
    kv_.copy_v(blk, kvh_, tok, 1, s_.vbuf.data() + (size_t)s_.n * kv_.dim);
    push_buffered(1);
    s_.kpos[s_.n] = c;
    s_.n += 1;
  }

  // Scores the tile against the packed queries and folds it into the online softmax.
  void fold() {
    const int n = s_.n, rows = rows_(), dim = kv_.dim;
    if (n == 0) return;
    float* S = s_.scores.data();
    const float* q = s_.q.data();
    for (const Segment& g : s_.segs) {
      if (!g.in_place) {
        gemm_abt(rows, g.len, dim, 1.0f, q, dim, s_.kbuf.data() + (size_t)g.col0 * dim, dim, 0.0f,
                 S + g.col0, kTile);
      } else if (kv_.k_rows()) {
        gemm_abt(rows, g.len, dim, 1.0f, q, dim, (const float*)kv_.kp(g.blk, kvh_, g.tok), (int)kv_.kt,
                 0.0f, S + g.col0, kTile);
      } else {
        gemm_ab(rows, g.len, dim, 1.0f, q, dim, (const float*)kv_.kp(g.blk, kvh_, g.tok), (int)kv_.kd,
                0.0f, S + g.col0, kTile);
      }
    }
    mask_and_softmax(n, rows);
    float* acc = s_.acc.data();
    for (const Segment& g : s_.segs) {
      if (g.in_place && kv_.v_rows()) {
        gemm_ab(rows, dim, g.len, 1.0f, S + g.col0, kTile, (const float*)kv_.vp(g.blk, kvh_, g.tok),
                (int)kv_.vt, 1.0f, acc, dim);
      } else if (g.in_place) {
        kv_.copy_v(g.blk, kvh_, g.tok, g.len, s_.vbuf.data() + (size_t)g.col0 * dim);
        gemm_ab(rows, dim, g.len, 1.0f, S + g.col0, kTile, s_.vbuf.data() + (size_t)g.col0 * dim, dim,
                1.0f, acc, dim);
      } else {
        gemm_ab(rows, dim, g.len, 1.0f, S + g.col0, kTile, s_.vbuf.data() + (size_t)g.col0 * dim, dim,
                1.0f, acc, dim);
      }
    }
    s_.segs.clear();
    s_.n = 0;
  }

 private:
  int rows_() const { return it_.ntok * it_.nheads; }

  void push_buffered(int len) {
    if (!s_.segs.empty() && !s_.segs.back().in_place && s_.segs.back().col0 + s_.segs.back().len == s_.n) {
      s_.segs.back().len += len;
    } else {
      s_.segs.push_back({s_.n, len, 0, 0, false});
    }
  }

  bool visible(int key, int p) const {
    if (key > p) return false;
    return rq_.mode != kWindow || key < rq_.sink || key > p - rq_.local;
  }

  void mask_and_softmax(int n, int rows) {
    int kmin = s_.kpos[0], kmax = s_.kpos[0];
    for (int j = 1; j < n; ++j) {
      kmin = std::min(kmin, s_.kpos[j]);
      kmax = std::max(kmax, s_.kpos[j]);
    }
    const int first_pos = s_.rowpos[0], last_pos = s_.rowpos[rows - 1];
    // Whole tile visible to every row: no per-key test.
    bool all_visible = kmax <= first_pos;
    if (all_visible && rq_.mode == kWindow) all_visible = kmax < rq_.sink || kmin > last_pos - rq_.local;
    for (int i = 0; i < rows; ++i) {
      float* si = s_.scores.data() + (size_t)i * kTile;
      const int p = s_.rowpos[i];
      if (!all_visible)
        for (int j = 0; j < n; ++j)
          if (!visible(s_.kpos[j], p)) si[j] = kNegInf;
      const float m_new = std::max(s_.m[i], row_max(si, n));
      if (m_new == kNegInf) {  // nothing visible to this row yet
        std::fill(si, si + n, 0.0f);
        continue;
      }
      const float correction = std::exp(s_.m[i] - m_new);
      s_.l[i] = s_.l[i] * correction + exp_shift_sum(si, n, m_new);
      s_.m[i] = m_new;
      if (correction != 1.0f) {
        float* ai = s_.acc.data() + (size_t)i * kv_.dim;
        for (int d = 0; d < kv_.dim; ++d) ai[d] *= correction;
      }
    }
  }

  const KV<T>& kv_;
  Scratch& s_;
  const Request& rq_;
  const Item& it_;
  const int* table_;
  int kvh_;
};

struct IndexSlot {
  const int* ranges;  // [H, R, NR, 2]
  const int* cols;    // [H, R, NC]
  int blocks, nr, nc, block_q;
};

template <typename T>
void run_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                   const torch::Tensor& table, const std::vector<Request>& reqs,
                   const std::vector<IndexSlot>& slots, double scale, int64_t gather_below,
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

  // Items, with a cost estimate: query rows x keys read.
  std::vector<Item> items;
  int max_rows = std::max(kGroupRows, group);
  for (int b = 0; b < (int)reqs.size(); ++b) {
    const Request& r = reqs[b];
    if (r.mode == kSkip || r.q_len == 0) continue;
    if (r.mode == kIndex) {
      const IndexSlot& sl = slots[r.slot];
      max_rows = std::max(max_rows, sl.block_q);
      for (int t0 = 0; t0 < r.q_len; t0 += sl.block_q) {
        const int nt = std::min(sl.block_q, r.q_len - t0);
        for (int h = 0; h < heads; ++h)
          items.push_back({b, h, 1, t0, nt, 0, INT32_MAX, -1, 0, (double)nt * (r.position(t0 + nt - 1) + 1)});
      }
    } else {
      const int tb = std::max(1, kGroupRows / group);
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
      const int parts = r.mode == kIndex ? 1 : std::min(per, keys / kTile);
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
  // Costliest first, so that the long items of a batch start early.
  std::vector<int> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = (int)i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return items[a].cost > items[b].cost; });
  const float sc = (float)scale;

#pragma omp parallel num_threads(threads)
  {
    Scratch s(max_rows, dim);
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
          float* dst = s.q.data() + (size_t)row * dim;
          for (int d = 0; d < dim; ++d) dst[d] = to_f(src[d]) * sc;
          s.rowpos[row] = r.position(it.tok0 + t);
        }
      std::fill(s.m.begin(), s.m.begin() + rows, kNegInf);
      std::fill(s.l.begin(), s.l.begin() + rows, 0.0f);
      std::fill(s.acc.begin(), s.acc.begin() + (size_t)rows * dim, 0.0f);
      s.segs.clear();
      s.n = 0;
      ItemRunner<T> run(kv, s, r, it, trow, kvh);
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
        const int* cc = sl.cols + ((int64_t)it.head0 * sl.blocks + blk) * sl.nc;
        for (int x = 0; x < sl.nc; ++x)
          if (cc[x] >= 0 && cc[x] <= last_pos) run.add_column(cc[x]);
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
  }

  // Merge split parts: softmax over the union = parts weighted by exp(m_part - m) / l.
  std::vector<int> groups;
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].group == (int)i) groups.push_back((int)i);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
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
// requests [B, 8] int32 rows (q0, q_len, seq_len, mode, sink, local, slot, block0);
// positions [T] int32 or empty; index slots: ranges [H, R, NR, 2], cols [H, R, NC] int32, block_q.
void paged_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor table,
                     torch::Tensor requests, torch::Tensor positions, std::vector<torch::Tensor> ranges,
                     std::vector<torch::Tensor> cols, std::vector<int64_t> block_q, double scale,
                     int64_t gather_below, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && key.dim() == 4 && value.dim() == 4, "paged_attention: ranks");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type() &&
              out.scalar_type() == query.scalar_type(), "paged_attention: one dtype for q, k, v, out");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "paged_attention: head_dim must be contiguous");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && requests.scalar_type() == torch::kInt32 &&
              requests.is_contiguous() && requests.size(1) == 8, "paged_attention: int32 tables");
  TORCH_CHECK(table.size(0) >= requests.size(0) && (table.size(0) == 0 || table.stride(1) == 1),
              "paged_attention: one block table row per request");
  TORCH_CHECK(ranges.size() == cols.size() && cols.size() == block_q.size(), "paged_attention: index slots");
  const int heads = (int)query.size(1);
  TORCH_CHECK(heads % key.size(1) == 0 && key.size(3) == query.size(2), "paged_attention: head counts / head_dim");
  const bool has_pos = positions.numel() > 0;
  TORCH_CHECK(!has_pos || (positions.scalar_type() == torch::kInt32 && positions.is_contiguous() &&
                           positions.numel() == query.size(0)), "paged_attention: positions [T] int32");
  std::vector<IndexSlot> slots;
  for (size_t s = 0; s < ranges.size(); ++s) {
    TORCH_CHECK(ranges[s].scalar_type() == torch::kInt32 && ranges[s].is_contiguous() && ranges[s].dim() == 4 &&
                ranges[s].size(0) == heads && ranges[s].size(3) == 2, "paged_attention: ranges [H, R, NR, 2]");
    TORCH_CHECK(cols[s].scalar_type() == torch::kInt32 && cols[s].is_contiguous() && cols[s].dim() == 3 &&
                cols[s].size(0) == heads && cols[s].size(1) == ranges[s].size(1), "paged_attention: cols [H, R, NC]");
    slots.push_back({ranges[s].data_ptr<int>(), cols[s].data_ptr<int>(), (int)ranges[s].size(1),
                     (int)ranges[s].size(2), (int)cols[s].size(2), (int)block_q[s]});
  }
  const int* rq = requests.data_ptr<int>();
  const int* pos = has_pos ? positions.data_ptr<int>() : nullptr;
  std::vector<Request> reqs;
  for (int64_t b = 0; b < requests.size(0); ++b) {
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
      run_attention<float>(query, key, value, table, reqs, slots, scale, gather_below, out);
      break;
    case torch::kBFloat16:
      run_attention<at::BFloat16>(query, key, value, table, reqs, slots, scale, gather_below, out);
      break;
    case torch::kFloat16:
      run_attention<at::Half>(query, key, value, table, reqs, slots, scale, gather_below, out);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "causal attention over a paged KV cache, dense/window/index per request (CPU)");
  m.def("last_query_sums", &last_query_sums, "column and diagonal attention mass of a chunk's last queries (CPU)");
  m.def("pooled_keys", &pooled_keys, "mean-pooled keys of one sequence (CPU)");
}
