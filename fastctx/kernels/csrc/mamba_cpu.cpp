// Mamba-1 selective scan on CPU: h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = h_t C_t + D x_t.
// One pass over the tokens for a block of channels at a time, their states held in a small buffer, so
// the [tokens, channels, state] decay and input tensors of the PyTorch reference are never built. The
// reference is selective_scan_reference in fastctx/kernels/mamba.py.

#include <torch/extension.h>

#include <cmath>

namespace {

constexpr int64_t kChannelBlock = 64;

}  // namespace

// x, delta [T, Ch]; A [Ch, N]; B, C [T, N]; D [Ch]; state [Ch, N], all float32 and contiguous.
// Returns y [T, Ch]; state is updated in place to the state after the last token.
torch::Tensor selective_scan_cpu(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& A,
                                 const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D,
                                 torch::Tensor& state) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &delta, &A, &B, &C, &D, &state}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(),
                "selective_scan_cpu takes contiguous float32 CPU tensors");
  }
  const int64_t T = x.size(0), Ch = x.size(1), N = A.size(1);
  TORCH_CHECK(delta.sizes() == x.sizes() && A.size(0) == Ch && B.size(0) == T && B.size(1) == N &&
                  C.sizes() == B.sizes() && D.size(0) == Ch && state.sizes() == A.sizes(),
              "selective_scan_cpu: inconsistent shapes");
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *dp = delta.data_ptr<float>(), *ap = A.data_ptr<float>();
  const float *bp = B.data_ptr<float>(), *cp = C.data_ptr<float>(), *Dp = D.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = state.data_ptr<float>();
  const int64_t blocks = (Ch + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t c0 = blk * kChannelBlock, c1 = std::min(Ch, c0 + kChannelBlock);
      for (int64_t t = 0; t < T; ++t) {
        const float* b = bp + t * N;
        const float* cc = cp + t * N;
        for (int64_t c = c0; c < c1; ++c) {
          const float dt = dp[t * Ch + c], xv = xp[t * Ch + c], u = dt * xv;
          const float* a = ap + c * N;
          float* h = sp + c * N;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < N; ++n) {
            h[n] = std::exp(dt * a[n]) * h[n] + u * b[n];
            acc += h[n] * cc[n];
          }
          yp[t * Ch + c] = acc + Dp[c] * xv;
        }
      }
    }
  });
  return y;
}

void register_mamba(pybind11::module& m) {
  m.def("selective_scan", &selective_scan_cpu, "Mamba-1 selective scan over one sequence (CPU)");
}
