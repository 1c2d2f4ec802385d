// CPU row pass of the fused linear + alpha-weighted cross-entropy; the chunked algorithm around it (the
// three GEMMs per chunk, the buffers, the reductions) is chunked_linear_ce.h's, shared with CUDA.
//
// Per chunk row: softcap c * tanh(x / c) in place (the logits buffer is the kernel's own), then the
// cross-entropy's fused row kernel (row_kernels.h, ce_row: loss and gradient in one read of the row),
// then the z-loss's term and the softcap's chain rule on the gradient. Reads the chunk's logits, writes
// its dlogits once, over the logits themselves unless softcap needs them afterwards
// (chunked_linear_ce.h); rows are independent and split over threads, each row's arithmetic is the
// same whatever the thread count.
//
// The CPU lists the non-ignored rows of a side (the labels are on the host: no sync), so ignored rows
// cost no GEMM work; it range-checks the labels in the same pass, before any GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "chunked_linear_ce.h"
#include "cpu/row_kernels.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;
using linear_ce::Options;
using linear_ce::Side;

template <typename A>
void chunk_rows(A* x, int64_t n, int64_t V, const int64_t* y, const Options& o, const double* scale, A* dx,
                double* loss) {
  const auto& f = loss_row_fns<A>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A* xr = x + i * V;
      A* g = dx ? dx + i * V : nullptr;
      if (y[i] == o.ignore) {  // reached only when the side was not gathered
        loss[i] = 0.0;
        if (g) std::fill(g, g + V, A(0));
        continue;
      }
      if (o.cap) {
        const A c = A(*o.cap);
        for (int64_t j = 0; j < V; ++j) xr[j] = c * std::tanh(xr[j] / c);
      }
      const A s = g ? A(scale[i]) : A(0);
      double lse = 0.0;
      double l = double(f.ce_row(xr, V, y[i], A(o.eps), g, s, &lse));  // g may be xr: x is gone after this
      if (o.z != 0.0) {
        l += o.z * lse * lse;
        if (g) {
          // z * lse^2 adds k * s * softmax(x), k = 2 z lse, to the gradient; ce_row's g is
          // s * (softmax - eps/V - (1 - eps) [j == y]), so s * softmax = g + s * (eps/V + (1 - eps) [j == y])
          // and the new gradient is g (1 + k) + k s (eps/V + (1 - eps) [j == y]): no second exp
          const A k = A(2.0 * o.z * lse), off = A(o.eps / double(V)) * s;
          for (int64_t j = 0; j < V; ++j) g[j] = g[j] * (A(1) + k) + k * off;
          g[y[i]] += k * s * A(1.0 - o.eps);
        }
      }
      if (g && o.cap) {  // d/dx c tanh(x / c) = 1 - tanh^2, from the capped value in xr (g is not xr here)
        const A c = A(*o.cap);
        for (int64_t j = 0; j < V; ++j) {
          const A t = xr[j] / c;
          g[j] *= A(1) - t * t;
        }
      }
      loss[i] = l;
    }
  });
}

struct CpuRows {
  struct Guard {
    explicit Guard(const Tensor&) {}
  };

  // x (n, V) float/double logits, y (n,), scale (n,) float64 or undefined, dx like x or undefined,
  // loss (n,) float64.
  static void rows(const Tensor& x, const Tensor& y, const Options& o, const Tensor& scale, const Tensor& dx,
                   const Tensor& loss) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "alpha_weighted_linear_cross_entropy_rows", [&] {
      chunk_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), y.const_data_ptr<int64_t>(), o,
                           scale.defined() ? scale.const_data_ptr<double>() : nullptr,
                           dx.defined() ? dx.data_ptr<scalar_t>() : nullptr, loss.data_ptr<double>());
    });
  }

  // The non-ignored rows, or undefined when no row is ignored; raises IndexError (the Python layer then
  // names the argument) for a label outside [0, V), before any GEMM.
  static Tensor kept_rows(const Side& s, int64_t V, int64_t ignore) {
    const int64_t* y = s.labels.const_data_ptr<int64_t>();
    const int64_t rows = s.labels.numel();
    std::vector<int64_t> keep;
    keep.reserve(rows);
    for (int64_t i = 0; i < rows; ++i) {
      if (y[i] == ignore) continue;
      TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < V, "label ", y[i], " at flat position ", i, " is outside [0, ", V,
                        ")");
      keep.push_back(i);
    }
    if (int64_t(keep.size()) == rows) return Tensor();
    return at::tensor(keep, s.labels.options());
  }

  // F.cross_entropy's divisor: the number of non-ignored rows.
  static Tensor mean_divisor(const Side& s, const Tensor& keep, int64_t) {
    return at::scalar_tensor(double(keep.defined() ? keep.numel() : s.labels.numel()), at::kDouble);
  }

  // Row order, whatever the thread count.
  static Tensor ordered_sum(const Tensor& loss) {
    const double* l = loss.const_data_ptr<double>();
    double s = 0.0;
    for (int64_t i = 0; i < loss.numel(); ++i) s += l[i];
    return at::scalar_tensor(s, at::kDouble);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, alpha_weighted_linear_cross_entropy, linear_ce::public_op<CpuRows>);
  FASTADAPT_IMPL(m, _alpha_weighted_linear_cross_entropy_forward, linear_ce::forward_op<CpuRows>);
  FASTADAPT_IMPL(m, _alpha_weighted_linear_cross_entropy_backward, linear_ce::backward_op<CpuRows>);
}

}  // namespace fastadapt::cpu
