// CUDA row pass of the fused linear + alpha-weighted cross-entropy; the chunked algorithm around it (the
// three cuBLAS GEMMs per chunk through ATen on the current stream, the reused buffers, the reductions)
// is chunked_linear_ce.h's, shared with the CPU.
//
// One block per row of a chunk's logits (rows x V, float32 for bf16/fp32 inputs, float64 for fp64):
//   pass 1: softcap c * tanh(x / c) written back in place (the buffer is the kernel's own), the row max
//           and, for label smoothing, the row sum;
//   pass 2: sum of exp(x - max) -> lse (float64, as the CPU's);
//   pass 3 (gradient wanted): dlogits = scale * (softmax * (1 + 2 z lse) - eps / V - (1 - eps) [j == y]),
//           times the softcap's 1 - (x / c)^2, written once (over the logits, unless softcap is set:
//           chunked_linear_ce.h).
// Reads the row 3 times and writes it at most twice; a chunk is small enough to stay in L2 between the
// GEMM that writes it and these passes (BENCHMARKS.md, issue 13, has what was measured on a GPU, if any).
// Conventions shared with the cross-entropy kernel: a label outside [0, V) that is not ignore_index
// cannot raise without a host sync, so that row's loss and gradient are NaN; nothing synchronises with
// the host (the mean's divisor is counted on the device); ignored rows are not gathered away here (that
// needs their count on the host) but cost no arithmetic beyond writing their zero gradient.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "chunked_linear_ce.h"
#include "cuda/common.cuh"
#include "register.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;
using linear_ce::Options;
using linear_ce::Side;

constexpr int kMaxThreads = 512;

struct RowArgs {
  int64_t V = 0, ignore = -100;
  double eps = 0.0, z = 0.0, cap = 0.0;
  bool has_cap = false;
};

template <typename A>
__global__ __launch_bounds__(kMaxThreads) void linear_ce_rows_kernel(A* __restrict__ x, const int64_t* __restrict__ y,
                                                                    const RowArgs a, const double* __restrict__ scale,
                                                                    A* __restrict__ dx, double* __restrict__ loss) {
  __shared__ A smem[kMaxThreads / 32];
  const int64_t row = blockIdx.x, V = a.V;
  A* xr = x + row * V;
  A* g = dx ? dx + row * V : nullptr;
  const int64_t yi = y[row];
  if (yi == a.ignore) {
    if (g) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = A(0);
    }
    if (threadIdx.x == 0) loss[row] = 0.0;
    return;
  }
  const bool bad = yi < 0 || yi >= V;
  const A cap = A(a.cap);
  A m = -dinf<A>(), sx = A(0);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    A v = xr[j];
    if (a.has_cap) {
      v = cap * tanh(v / cap);
      xr[j] = v;
    }
    m = nan_max(m, v);
    sx += v;
  }
  m = block_max(m, smem);  // its barrier also publishes pass 1's capped values
  // read before the barrier of the next block_sum: pass 3 may write the gradient over x (in place)
  const double xy = bad ? dnan<double>() : double(xr[yi]);
  if (a.eps != 0.0) sx = block_sum(sx, smem);
  A s = A(0);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += dexp(xr[j] - m);
  s = block_sum(s, smem);
  const double lse = double(m) + ::log(double(s));
  if (threadIdx.x == 0) {
    double l = lse - (1.0 - a.eps) * xy - a.eps / double(V) * double(sx);
    if (a.z != 0.0) l += a.z * lse * lse;
    loss[row] = l;
  }
  if (!g) return;
  const A sc = A(scale[row]), lse_a = A(lse), k = A(1.0 + 2.0 * a.z * lse), smooth = A(a.eps / double(V));
  const A hit = A(1.0 - a.eps);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const A v = xr[j];
    A d = sc * (dexp(v - lse_a) * k - smooth - (j == yi ? hit : A(0)));
    if (a.has_cap) {
      const A t = v / cap;
      d *= A(1) - t * t;
    }
    g[j] = bad ? dnan<A>() : d;
  }
}

struct CudaRows {
  struct Guard {
    c10::cuda::CUDAGuard device;
    explicit Guard(const Tensor& t) : device(t.device()) {}
  };

  static void rows(const Tensor& x, const Tensor& y, const Options& o, const Tensor& scale, const Tensor& dx,
                   const Tensor& loss) {
    const int64_t n = x.size(0), V = x.size(1);
    if (n == 0) return;
    TORCH_CHECK(n <= int64_t(INT32_MAX), "too many rows in one chunk");
    RowArgs a;
    a.V = V;
    a.ignore = o.ignore;
    a.eps = o.eps;
    a.z = o.z;
    a.has_cap = o.cap.has_value();
    a.cap = o.cap.value_or(1.0);
    const int threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (V + 31) / 32 * 32)));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "alpha_weighted_linear_cross_entropy_rows_cuda", [&] {
      linear_ce_rows_kernel<scalar_t><<<unsigned(n), threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), a,
          scale.defined() ? scale.const_data_ptr<double>() : nullptr,
          dx.defined() ? dx.data_ptr<scalar_t>() : nullptr, loss.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Gathering the non-ignored rows would need their count on the host: a sync. Every row is evaluated.
  static Tensor kept_rows(const Side&, int64_t, int64_t) { return Tensor(); }

  // The number of non-ignored rows, counted on the device.
  static Tensor mean_divisor(const Side& s, const Tensor&, int64_t ignore) {
    return s.labels.ne(ignore).sum().to(at::kDouble);
  }

  // ATen's reduction: a fixed order for a given size on a given GPU.
  static Tensor ordered_sum(const Tensor& loss) { return loss.sum(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  FASTADAPT_IMPL(m, alpha_weighted_linear_cross_entropy, linear_ce::public_op<CudaRows>);
  FASTADAPT_IMPL(m, _alpha_weighted_linear_cross_entropy_forward, linear_ce::forward_op<CudaRows>);
  FASTADAPT_IMPL(m, _alpha_weighted_linear_cross_entropy_backward, linear_ce::backward_op<CudaRows>);
}

}  // namespace fastadapt::cuda
