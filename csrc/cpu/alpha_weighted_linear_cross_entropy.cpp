// CPU kernel of the fused linear + alpha-weighted cross-entropy (issue 13, work in progress):
//   loss = alpha * L(target) + (1 - alpha) * L(source),  L = mean/sum of CE(softcap(h @ W.T + b), y) + z * lse^2
//
// Why chunks: the logits of a language model's head (rows x V) are the memory cliff of the loss. Each
// side's rows go through in chunks of chunk_size: the chunk's logits come from one GEMM into a buffer
// reused for every chunk, the existing fused row kernel (row_kernels.h, ce_row) turns each row into its
// loss and its gradient in the same pass, and two more GEMMs turn the chunk's dlogits into the chunk's
// rows of grad_hidden and into grad_weight (+=, one buffer in the accumulation type for the whole call).
// So the extra memory is ~3 chunk x V buffers plus the fp32 weight gradient, whatever the rows.
//
// Why the gradients are computed in the forward pass: grad_weight sums over every row, so building it
// in backward would run the logits GEMM again. The loss of reduction mean/sum has one grad_output; the
// autograd node (autograd/alpha_weighted_linear_cross_entropy.cpp) scales these unit-grad_output
// gradients by it.
//
// Determinism: rows are independent in the row pass (per-row losses to a buffer, summed in row order),
// and the chunks are accumulated into grad_weight in a fixed order, so for a given chunk size the
// result does not depend on the row pass's threads. (The GEMMs are ATen's / the BLAS's: whether MKL's
// sums depend on its thread count is not measured yet, see NOTES-issue13.md.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "alpha_weighted_linear_cross_entropy.h"
#include "cpu/row_kernels.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;

struct Options {
  int64_t ignore;
  double eps, z;
  std::optional<double> cap;
};

// The rows of one chunk: logits x (n, V) in the accumulation type (softcap applied in place: the buffer
// is this kernel's own), labels y. Writes each row's loss and, when dx is non-null, its gradient
// scaled by `scale` (0 at ignored rows).
template <typename A>
void chunk_rows(A* x, int64_t n, int64_t V, const int64_t* y, const Options& o, A scale, A* dx, double* loss) {
  const auto& f = loss_row_fns<A>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A* xr = x + i * V;
      A* g = dx ? dx + i * V : nullptr;
      if (y[i] == o.ignore) {
        loss[i] = 0.0;
        if (g) std::fill(g, g + V, A(0));
        continue;
      }
      if (o.cap) {
        const A c = A(*o.cap);
        for (int64_t j = 0; j < V; ++j) xr[j] = c * std::tanh(xr[j] / c);
      }
      double lse = 0.0;
      double l = double(f.ce_row(xr, V, y[i], A(o.eps), g, scale, &lse));
      if (o.z != 0.0) {
        // z * lse^2 adds 2 z lse softmax(x) to the gradient; the softmax is recomputed here (one more exp
        // per element, paid only with z_loss; ce_row keeps its exponentials to itself)
        l += o.z * lse * lse;
        if (g) {
          const double k = 2.0 * o.z * lse * double(scale);
          for (int64_t j = 0; j < V; ++j) g[j] += A(k * std::exp(double(xr[j]) - lse));
        }
      }
      if (g && o.cap) {  // d/dx c tanh(x / c) = 1 - tanh^2, from the capped value already in xr
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

// The gradient buffers of one call (undefined when not wanted): gh this side's hidden (rows, D),
// gw the weight's and gb the bias's, in the accumulation type.
struct Grads {
  Tensor gh, gw, gb;
  bool any() const { return gh.defined() || gw.defined() || gb.defined(); }
};

// One side's rows, chunk by chunk; loss gets the per-row losses.
template <typename scalar_t>
void side_pass(const Tensor& h, const int64_t* y, const Tensor& w, const std::optional<Tensor>& bias,
               const Options& o, int64_t chunk, double scale, const Grads& g, double* loss) {
  using A = acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, A>;
  const int64_t rows = h.size(0), V = w.size(0);
  const int64_t c = std::min(chunk, rows);
  constexpr auto acc_type = c10::CppTypeToScalarType<A>::value;
  const auto acc = h.options().dtype(acc_type);
  // the logits chunk in the inputs' dtype (the unfused composition rounds its logits there too); for
  // bf16 it is widened into xa, and later holds the rounded dlogits of grad_hidden's GEMM
  Tensor xb = at::empty({c, V}, h.options());
  Tensor xa = kWiden ? at::empty({c, V}, acc) : xb;
  Tensor dx = g.any() ? at::empty({c, V}, acc) : Tensor();
  const Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const Tensor hc = h.narrow(0, r0, n);
    Tensor xv = xb.narrow(0, 0, n);
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(xv, *bias, hc, wt);
    } else {
      at::mm_out(xv, hc, wt);
    }
    Tensor xav = xa.narrow(0, 0, n);
    if constexpr (kWiden) xav.copy_(xv);
    Tensor dxv = g.any() ? dx.narrow(0, 0, n) : Tensor();
    chunk_rows<A>(xav.data_ptr<A>(), n, V, y + r0, o, A(scale), g.any() ? dxv.data_ptr<A>() : nullptr, loss + r0);
    if (!g.any()) continue;
    if (g.gh.defined()) {
      Tensor ghc = g.gh.narrow(0, r0, n);
      if constexpr (kWiden) {
        xv.copy_(dxv);  // grad_hidden's GEMM in the inputs' dtype, as the unfused composition's
        at::mm_out(ghc, xv, w);
      } else {
        at::mm_out(ghc, dxv, w);
      }
    }
    if (g.gw.defined()) g.gw.addmm_(dxv.t(), kWiden ? hc.to(acc_type) : hc);  // fp32 accumulation for bf16
    if (g.gb.defined()) g.gb.add_(dxv.sum(0));
  }
}

void check_args(const Tensor& sh, const Tensor& sy, const Tensor& th, const Tensor& ty, const Tensor& w,
                const std::optional<Tensor>& bias, int64_t reduction, int64_t chunk) {
  TORCH_CHECK(reduction == kMean || reduction == kSum, "this kernel takes reduction mean (1) or sum (2), got ",
              reduction);
  TORCH_CHECK(chunk > 0, "chunk_size must be positive");
  TORCH_CHECK(w.dim() == 2, "weight must be (V, D)");
  for (const Tensor* h : {&sh, &th}) {
    TORCH_CHECK(h->dim() == 2 && h->size(1) == w.size(1), "hidden must be (rows, D) with the weight's D");
    TORCH_CHECK(h->scalar_type() == w.scalar_type(), "hidden and weight must share a dtype");
  }
  TORCH_CHECK(sy.numel() == sh.size(0) && ty.numel() == th.size(0), "one label per hidden row");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == w.scalar_type(),
                "bias must be (V,) in the weight's dtype");
  }
}

ops::LinearCeForward forward(const Tensor& sh, const Tensor& sy, const Tensor& th, const Tensor& ty, const Tensor& w,
                             const std::optional<Tensor>& bias, const Tensor& alpha, int64_t ignore, double eps,
                             int64_t reduction, double z, std::optional<double> cap, int64_t chunk,
                             std::array<bool, 4> write_grad) {
  check_args(sh, sy, th, ty, w, bias, reduction, chunk);
  const SideWeights sw = cpu_side_weights(alpha);
  const bool has_bias = bias.has_value() && bias->defined();
  const Options o{ignore, eps, z, cap};
  const std::array<Tensor, 2> hidden = {sh.contiguous(), th.contiguous()};
  std::array<CeSide, 2> sides;
  std::array<double, 2> denom{};
  for (int k = 0; k < 2; ++k) {
    sides[k].labels = (k == 0 ? sy : ty).reshape({-1}).to(at::kLong).contiguous();
    sides[k].rows = hidden[k].size(0);
    sides[k].classes = w.size(0);
    // labels range-checked before any GEMM (mean_divisor raises IndexError), for evaluated sides only
    if (!sw.skipped(k)) denom[k] = mean_divisor(sides[k], ignore);
  }
  const auto acc = w.options().dtype(at::toOpMathType(w.scalar_type()));
  std::array<Tensor, 2> gh;
  for (int k = 0; k < 2; ++k) {
    gh[k] = grad_buffer(plan_grad(write_grad[k], sw.skipped(k)), hidden[k].sizes(), hidden[k].options(), empty_tensor);
  }
  const Tensor gw = write_grad[2] ? at::zeros(w.sizes(), acc) : at::empty({0}, acc);
  const Tensor gb = write_grad[3] && has_bias ? at::zeros({w.size(0)}, acc) : at::empty({0}, acc);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, w.scalar_type(), "alpha_weighted_linear_cross_entropy_cpu", [&] {
    for (int k = 0; k < 2; ++k) {
      if (sw.skipped(k)) continue;  // a zero-weight side is not read
      const double wk = *sw.w[k];
      // F.cross_entropy's mean over no rows is NaN with zero gradients: scale 0, loss 0/0 below
      const double scale = reduction == kMean ? (denom[k] > 0 ? wk / denom[k] : 0.0) : wk;
      std::vector<double> loss(sides[k].rows);
      const Grads g{write_grad[k] ? gh[k] : Tensor(), write_grad[2] ? gw : Tensor(),
                    write_grad[3] && has_bias ? gb : Tensor()};
      side_pass<scalar_t>(hidden[k], sides[k].labels.const_data_ptr<int64_t>(), w, bias, o, chunk, scale, g,
                          loss.data());
      double s = 0.0;  // row order: independent of the thread count
      for (double l : loss) s += l;
      total += reduction == kMean ? wk * (s / denom[k]) : wk * s;
    }
  });
  return {at::scalar_tensor(total, acc), gh[0], gh[1], gw, gb};
}

Tensor forward_public(const Tensor& sh, const Tensor& sy, const Tensor& th, const Tensor& ty, const Tensor& w,
                      const std::optional<Tensor>& bias, const Tensor& alpha, int64_t ignore, double eps,
                      int64_t reduction, double z, std::optional<double> cap, int64_t chunk) {
  return std::get<0>(forward(sh, sy, th, ty, w, bias, alpha, ignore, eps, reduction, z, cap, chunk, {}));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, alpha_weighted_linear_cross_entropy, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_linear_cross_entropy_forward, forward);
}

}  // namespace fastadapt::cpu
