// Sparse causal prefill attention on CPU, float32.
//
// Layout (one sequence): q [H, Tq, D], k/v [Hkv, Tk, D], Tk = prefix + Tq.
// For every (head, query block of `block_q` rows) the index lists what to
// read: contiguous key ranges [start, end) and single key columns. The
// causal limit (key <= prefix + row) is applied on top. Dense attention is
// one range [0, end of block) per block.
//
// Each (head, query block) is one task: scores of the block against a chunk
// of keys come from MKL's sgemm (exported by libtorch_cpu), then an online
// softmax folds the chunk into the block's accumulator, as in FlashAttention.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int kChunk = 256;  // keys per score tile
constexpr int kEstRows = 16;  // query rows per estimation tile

// Row-major C[m, n] = alpha * A[m, k] @ B[n, k]^T (+ beta * C), via column-major sgemm.
inline void gemm_abt(int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                     int ldb, float beta, float* c, int ldc) {
  // Column-major view: C^T[n, m] = B[n, k] @ A^T[k, m].
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C[m, n] += A[m, k] @ B[k, n].
inline void gemm_ab_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                        float* c, int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc);
}

struct BlockState {
  int rows, dim;
  std::vector<float> m, l, acc, scores, kbuf, vbuf;
  BlockState(int block_q, int dim)
      : rows(0), dim(dim), m(block_q), l(block_q), acc((size_t)block_q * dim),
        scores((size_t)block_q * kChunk), kbuf((size_t)kChunk * dim), vbuf((size_t)kChunk * dim) {}
  void reset(int r) {
    rows = r;
    std::fill(m.begin(), m.begin() + r, -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.begin() + r, 0.0f);
    std::fill(acc.begin(), acc.begin() + (size_t)r * dim, 0.0f);
  }
};

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// exp(x) for 8 floats (Cephes polynomial, relative error ~1e-7). Inputs
// below -87 (masked scores are -inf) give ~1e-38, not 0: negligible against a
// row sum that is at least 1.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                    _mm256_set1_ps(-87.0f));
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
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
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
  float r = -std::numeric_limits<float>::infinity();
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

// Fold one tile of n keys into the block. key_pos[j] is the position of key
// j; when `contiguous`, only key_pos[0] is read (key j is at key_pos[0] + j)
// and the causal cut is one index per row. Keys/values are rows of length dim
// at kp/vp.
void fold_tile(BlockState& st, const float* qp, int first_pos, int n, const int* key_pos,
               bool contiguous, const float* kp, const float* vp, float scale) {
  const int rows = st.rows, dim = st.dim;
  float* s = st.scores.data();
  gemm_abt(rows, n, dim, scale, qp, dim, kp, dim, 0.0f, s, n);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool crosses_diagonal = !contiguous || key_pos[0] + n - 1 > first_pos;
  for (int i = 0; i < rows; ++i) {
    float* si = s + (size_t)i * n;
    const int limit = first_pos + i;  // last visible key position for this row
    if (crosses_diagonal) {
      if (contiguous) {
        for (int j = std::max(0, limit - key_pos[0] + 1); j < n; ++j) si[j] = neg_inf;
      } else {
        for (int j = 0; j < n; ++j)
          if (key_pos[j] > limit) si[j] = neg_inf;
      }
    }
    const float m_new = std::max(st.m[i], row_max(si, n));
    if (m_new == neg_inf) {  // nothing visible yet in this row
      std::fill(si, si + n, 0.0f);
      continue;
    }
    const float correction = std::exp(st.m[i] - m_new);
    st.l[i] = st.l[i] * correction + exp_shift_sum(si, n, m_new);
    st.m[i] = m_new;
    if (correction != 1.0f) {
      float* ai = st.acc.data() + (size_t)i * dim;
      for (int d = 0; d < dim; ++d) ai[d] *= correction;
    }
  }
  gemm_ab_acc(rows, dim, n, s, n, vp, dim, st.acc.data(), dim);
}

}  // namespace

// ranges: [H, R, NR, 2] int32 (start, end) with start >= end meaning "empty";
// cols: [H, R, NC] int32, -1 meaning "empty". Returns out [H, Tq, D].
torch::Tensor sparse_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             torch::Tensor ranges, torch::Tensor cols, int64_t prefix,
                             int64_t block_q, double scale, int64_t gather_below) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 &&
              v.dtype() == torch::kFloat32, "sparse_prefill: float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q/k/v");
  TORCH_CHECK(ranges.dtype() == torch::kInt32 && cols.dtype() == torch::kInt32, "int32 index");
  const int heads = q.size(0), tq = q.size(1), dim = q.size(2);
  const int kv_heads = k.size(0), tk = k.size(1);
  const int group = heads / kv_heads;
  const int nblocks = (tq + block_q - 1) / block_q;
  TORCH_CHECK(ranges.size(0) == heads && ranges.size(1) == nblocks && ranges.size(3) == 2,
              "ranges must be [heads, query blocks, n, 2]");
  TORCH_CHECK(cols.size(0) == heads && cols.size(1) == nblocks, "cols must be [heads, query blocks, n]");
  auto rng = ranges.contiguous();
  auto cl = cols.contiguous();
  auto out = torch::empty_like(q);
  const int nr = rng.size(2), nc = cl.size(2);
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const int* rd = rng.data_ptr<int>();
  const int* cd = cl.data_ptr<int>();
  float* od = out.data_ptr<float>();
  const float sc = (float)scale;
  const int64_t tasks = (int64_t)heads * nblocks;

#pragma omp parallel
  {
    BlockState st(block_q, dim);
    std::vector<int> pos(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      // Last blocks first: they read the most keys, so they start early.
      const int h = (int)(t % heads);
      const int r = nblocks - 1 - (int)(t / heads);
      const int kvh = h / group;
      const int row0 = r * block_q;
      const int rows = std::min((int)block_q, tq - row0);
      const int first_pos = (int)prefix + row0;
      const float* qp = qd + ((size_t)h * tq + row0) * dim;
      const float* kh = kd + (size_t)kvh * tk * dim;
      const float* vh = vd + (size_t)kvh * tk * dim;
      st.reset(rows);
      // Single columns and short ranges are copied into one buffer and folded as
      // full tiles: one small sgemm per short range costs more than the copy.
      int n = 0;
      auto gather = [&](int c) {
        std::copy(kh + (size_t)c * dim, kh + (size_t)(c + 1) * dim, st.kbuf.data() + (size_t)n * dim);
        std::copy(vh + (size_t)c * dim, vh + (size_t)(c + 1) * dim, st.vbuf.data() + (size_t)n * dim);
        pos[n++] = c;
        if (n == kChunk) {
          fold_tile(st, qp, first_pos, n, pos.data(), false, st.kbuf.data(), st.vbuf.data(), sc);
          n = 0;
        }
      };
      const int* rr = rd + ((size_t)h * nblocks + r) * nr * 2;
      for (int x = 0; x < nr; ++x) {
        const int start = std::max(rr[2 * x], 0);
        const int end = std::min(rr[2 * x + 1], first_pos + rows);
        if (end - start < gather_below) {
          for (int c = start; c < end; ++c) gather(c);
          continue;
        }
        for (int s = start; s < end; s += kChunk) {
          int first_key = s;
          fold_tile(st, qp, first_pos, std::min(kChunk, end - s), &first_key, true,
                    kh + (size_t)s * dim, vh + (size_t)s * dim, sc);
        }
      }
      const int* cc = cd + ((size_t)h * nblocks + r) * nc;
      for (int x = 0; x < nc; ++x) {
        const int c = cc[x];
        if (c >= 0 && c < first_pos + rows) gather(c);
      }
      if (n > 0) fold_tile(st, qp, first_pos, n, pos.data(), false, st.kbuf.data(), st.vbuf.data(), sc);
      float* op = od + ((size_t)h * tq + row0) * dim;
      for (int i = 0; i < rows; ++i) {
        const float inv = st.l[i] > 0.0f ? 1.0f / st.l[i] : 0.0f;
        const float* ai = st.acc.data() + (size_t)i * dim;
        for (int d = 0; d < dim; ++d) op[(size_t)i * dim + d] = ai[d] * inv;
      }
    }
  }
  return out;
}

// Attention of a chunk's last n queries (they end at the last key) over every
// key, reduced on the fly to what the index estimators read: the mass on each
// key column, and on each diagonal offset (query position - key position).
// The [H, n, Tk] probabilities are never stored: each tile of kEstRows rows
// is scored with sgemm, softmaxed row by row, and folded into both sums.
// q [H, n, D], k [Hkv, Tk, D]; returns {vertical [H, Tk], slash [H, Tk]}.
std::vector<torch::Tensor> last_query_sums(torch::Tensor q, torch::Tensor k, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32, "last_query_sums: float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "contiguous q/k");
  const int heads = q.size(0), n = q.size(1), dim = q.size(2);
  const int kv_heads = k.size(0), tk = k.size(1);
  TORCH_CHECK(n >= 1 && n <= tk && heads % kv_heads == 0, "last_query_sums: bad shapes");
  const int group = heads / kv_heads;
  const int last = tk - 1;  // position of the last query
  auto vertical = torch::zeros({heads, tk}, q.options());
  auto slash = torch::zeros({heads, tk}, q.options());
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  float* vd = vertical.data_ptr<float>();
  float* sd = slash.data_ptr<float>();
  const float sc = (float)scale;

#pragma omp parallel
  {
    std::vector<float> scores((size_t)kEstRows * tk), by_shift(tk);
#pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < heads; ++h) {
      const float* kh = kd + (size_t)(h / group) * tk * dim;
      float* vert = vd + (size_t)h * tk;
      // by_shift[u] collects offset last - u: row p adds its key j at u = j + (last - p),
      // so every row's update is one contiguous, vectorizable run.
      std::fill(by_shift.begin(), by_shift.end(), 0.0f);
      for (int r0 = 0; r0 < n; r0 += kEstRows) {
        const int rows = std::min(kEstRows, n - r0);
        const int width = tk - n + r0 + rows;  // keys visible to the tile's last row
        gemm_abt(rows, width, dim, sc, qd + ((size_t)h * n + r0) * dim, dim, kh, dim, 0.0f,
                 scores.data(), width);
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
  return {vertical, slash};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_prefill", &sparse_prefill, "sparse causal prefill attention (CPU, fp32)");
  m.def("last_query_sums", &last_query_sums, "column and diagonal attention mass of the last queries (CPU, fp32)");
}
