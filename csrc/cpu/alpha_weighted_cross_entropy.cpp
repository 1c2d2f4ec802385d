// CPU kernels of the alpha-weighted cross-entropy:
//   loss = alpha * CE(target_logits, target_labels) + (1 - alpha) * CE(source_logits, source_labels)
//
// What it fuses: log-sum-exp, the label-smoothed NLL, the per-side mean over non-ignored rows, the
// alpha weighting and (under autograd, reduction mean/sum) the gradient for a unit grad_output.
// Reads each logits row from memory once and writes each gradient row once; log_softmax is never
// materialised. Rows of both sides share one at::parallel_for. Per-row losses go to a small buffer
// and are summed in a fixed order, so results do not depend on the thread count.
//
// Why the gradient is written in the forward pass here: on these CPUs the op is bound by exp()
// throughput and page faults, not DRAM. Writing the gradient while the row is still in L2 costs one
// exp per element; recomputing it in backward costs a second exp and a second read of the logits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "cpu/ce_side.h"
#include "cpu/grad_buffer.h"
#include "cpu/loss_rows.h"
#include "loss_common.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;

// Row-wise forward for one dtype. row_loss[r] gets the unweighted loss (0 at ignored or skipped rows).
// Work items are blocks of kBlockRows rows of one side; wide rows are then done one at a time.
template <typename scalar_t>
void forward_rows(const CeSide& s, const CeSide& t, int64_t ignore, double eps, std::array<Tensor, 2>& grads,
                  std::array<double, 2> grad_scale, std::vector<double>& row_loss, std::array<Tensor, 2>& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const auto& f = row_fns<acc_t>();
  const std::array<const CeSide*, 2> sides = {&s, &t};
  double* const lse_p[2] = {lse[0].data_ptr<double>(), lse[1].data_ptr<double>()};
  scalar_t* const grad_p[2] = {grads[0].numel() ? grads[0].data_ptr<scalar_t>() : nullptr,
                               grads[1].numel() ? grads[1].data_ptr<scalar_t>() : nullptr};
  const int64_t blocks_s = (s.rows + kBlockRows - 1) / kBlockRows;
  const int64_t blocks = blocks_s + (t.rows + kBlockRows - 1) / kBlockRows;
  const int64_t C = std::max<int64_t>({s.classes, t.classes, 1});
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (C * kBlockRows));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t scratch = C <= kSmallClasses ? kBlockRows * C : C;
    std::vector<acc_t> xs(kWiden ? scratch : 0), gs(kWiden ? scratch : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int side = b < blocks_s ? 0 : 1;
      const CeSide& d = *sides[side];
      const int64_t r0 = (side == 0 ? b : b - blocks_s) * kBlockRows;
      const int64_t n = std::min(kBlockRows, d.rows - r0), Cd = d.classes;
      double* loss = row_loss.data() + (side == 0 ? 0 : s.rows) + r0;
      scalar_t* g = grad_p[side] ? grad_p[side] + r0 * Cd : nullptr;
      if (!d.evaluated) {  // a zero-weight side is not read at all
        std::fill(loss, loss + n, 0.0);
        std::fill(lse_p[side] + r0, lse_p[side] + r0 + n, 0.0);
        if (g) std::memset(g, 0, sizeof(scalar_t) * n * Cd);
        continue;
      }
      const acc_t sc = acc_t(grad_scale[side]);
      if (Cd <= kSmallClasses) {
        // narrow rows: the whole block at once (bf16 widened into a float scratch block first)
        const acc_t* x;
        int64_t stride;
        if constexpr (kWiden) {
          for (int64_t l = 0; l < n; ++l) at::vec::convert(d.row<scalar_t>(r0 + l), xs.data() + l * Cd, Cd);
          x = xs.data();
          stride = Cd;
        } else {
          x = d.row<scalar_t>(r0);
          stride = d.row_stride;
        }
        acc_t* ga = g ? (kWiden ? gs.data() : reinterpret_cast<acc_t*>(g)) : nullptr;
        f.ce_rows_small(x, stride, Cd, d.y + r0, n, ignore, acc_t(eps), ga, sc, lse_p[side] + r0, loss);
        if constexpr (kWiden) {
          if (g) at::vec::convert(gs.data(), g, n * Cd);
        }
        continue;
      }
      // wide rows one at a time, so each stays in L2 across the passes of ce_row
      for (int64_t l = 0; l < n; ++l) {
        const int64_t y = d.y[r0 + l];
        scalar_t* gl = g ? g + l * Cd : nullptr;
        if (y == ignore) {
          loss[l] = 0.0;
          lse_p[side][r0 + l] = 0.0;
          if (gl) std::memset(gl, 0, sizeof(scalar_t) * Cd);
          continue;
        }
        if constexpr (kWiden) {
          at::vec::convert(d.row<scalar_t>(r0 + l), xs.data(), Cd);
          loss[l] = f.ce_row(xs.data(), Cd, y, acc_t(eps), gl ? gs.data() : nullptr, sc, lse_p[side] + r0 + l);
          if (gl) at::vec::convert(gs.data(), gl, Cd);
        } else {
          loss[l] = f.ce_row(d.row<scalar_t>(r0 + l), Cd, y, acc_t(eps), gl, sc, lse_p[side] + r0 + l);
        }
      }
    }
  });
}

using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardOut forward(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                   int64_t ignore, double eps, int64_t reduction, std::array<bool, 2> write_grad) {
  check_cross_entropy_args(sl, sy, tl, ty, alpha, eps, reduction);
  TORCH_CHECK(alpha.is_cpu(), "alpha must be on the CPU for CPU inputs, got ", alpha.device());
  const double a = cpu_alpha_value(alpha);
  CeSide s = make_ce_side(sl, sy, 1.0 - a);
  CeSide t = make_ce_side(tl, ty, a);
  // Labels are checked before any arithmetic, so a bad label leaves nothing half-written.
  const std::array<int64_t, 2> counts = {s.count_valid(ignore, "source_labels"), t.count_valid(ignore, "target_labels")};

  const auto opts = sl.options();
  std::array<Tensor, 2> lse = {at::empty({s.rows}, opts.dtype(at::kDouble)), at::empty({t.rows}, opts.dtype(at::kDouble))};
  std::array<Tensor, 2> grads;
  std::array<double, 2> grad_scale{};
  const std::array<const CeSide*, 2> sides = {&s, &t};
  for (int k = 0; k < 2; ++k) {
    const CeSide& d = *sides[k];
    const bool want = write_grad[k];
    if (!want) {
      grads[k] = at::empty({0}, opts);
    } else if (!d.evaluated) {
      grads[k] = at::zeros(d.logits_sizes, opts);
    } else {
      grads[k] = empty_large(d.logits_sizes, opts);
    }
    grad_scale[k] = reduction == kMean ? d.weight / double(counts[k]) : d.weight;
  }
  std::vector<double> row_loss(s.rows + t.rows);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_cpu", [&] {
    forward_rows<scalar_t>(s, t, ignore, eps, grads, grad_scale, row_loss, lse);
  });

  Tensor out0, out1;
  if (reduction == kNone) {
    auto emit = [&](const CeSide& d, int64_t offset) {
      Tensor out = at::empty(d.label_sizes, opts.dtype(acc_type_for(sl.scalar_type())));
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "awce_none", [&] {
        auto* p = out.data_ptr<scalar_t>();
        for (int64_t i = 0; i < d.rows; ++i) p[i] = scalar_t(d.weight * row_loss[offset + i]);
      });
      return out.to(sl.scalar_type());
    };
    out0 = emit(s, 0);
    out1 = emit(t, s.rows);
  } else {
    double total = 0.0;
    const std::array<int64_t, 2> offset = {0, s.rows};
    for (int k = 0; k < 2; ++k) {
      const CeSide& d = *sides[k];
      if (!d.evaluated) continue;  // a zero-weight term is not evaluated: no NaN from an empty side
      double sum = 0.0;
      for (int64_t i = 0; i < d.rows; ++i) sum += row_loss[offset[k] + i];
      total += reduction == kMean ? d.weight * (sum / double(counts[k])) : d.weight * sum;
    }
    out0 = at::scalar_tensor(total, opts);
    out1 = empty_marker(sl);
  }
  Tensor cnt = at::empty({2}, opts.dtype(at::kLong));
  cnt.data_ptr<int64_t>()[0] = counts[0];
  cnt.data_ptr<int64_t>()[1] = counts[1];
  return {out0, out1, lse[0], lse[1], cnt, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                          const Tensor& alpha, int64_t ignore, double eps, int64_t reduction) {
  auto out = forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

template <typename scalar_t>
void backward_rows(const CeSide& s, const CeSide& t, int64_t ignore, double eps, std::array<Tensor, 2>& grads,
                   const std::array<const double*, 2>& row_scale, std::array<double, 2> scale,
                   const std::array<Tensor, 2>& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const auto& f = row_fns<acc_t>();
  const int64_t C = std::max(s.classes, t.classes);
  const double* const lse_p[2] = {lse[0].const_data_ptr<double>(), lse[1].const_data_ptr<double>()};
  scalar_t* const grad_p[2] = {grads[0].numel() ? grads[0].data_ptr<scalar_t>() : nullptr,
                               grads[1].numel() ? grads[1].data_ptr<scalar_t>() : nullptr};
  at::parallel_for(0, s.rows + t.rows, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(kWiden ? C : 0), gs(kWiden ? C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int side = r < s.rows ? 0 : 1;
      if (grad_p[side] == nullptr) continue;
      const CeSide& d = side == 0 ? s : t;
      const int64_t i = side == 0 ? r : r - s.rows;
      scalar_t* grow = grad_p[side] + i * d.classes;
      const int64_t y = d.label(i);
      if (y == ignore) {
        std::memset(grow, 0, sizeof(scalar_t) * d.classes);
        continue;
      }
      const acc_t k = acc_t(row_scale[side] ? row_scale[side][i] * scale[side] : scale[side]);
      const double l = lse_p[side][i];
      const scalar_t* x = d.row<scalar_t>(i);
      if constexpr (kWiden) {
        at::vec::convert(x, xs.data(), d.classes);
        f.ce_grad_row(xs.data(), d.classes, y, acc_t(eps), l, k, gs.data());
        at::vec::convert(gs.data(), grow, d.classes);
      } else {
        f.ce_grad_row(x, d.classes, y, acc_t(eps), l, k, grow);
      }
    }
  });
}

std::tuple<Tensor, Tensor> backward(const std::optional<Tensor>& g0, const std::optional<Tensor>& g1,
                                    const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                    const Tensor& alpha, const Tensor& lse_s, const Tensor& lse_t, const Tensor& counts,
                                    int64_t ignore, double eps, int64_t reduction, std::array<bool, 2> mask) {
  check_cross_entropy_args(sl, sy, tl, ty, alpha, eps, reduction);
  const double a = cpu_alpha_value(alpha);
  CeSide s = make_ce_side(sl, sy, 1.0 - a);
  CeSide t = make_ce_side(tl, ty, a);
  const auto opts = sl.options();
  // Labels may have been changed in place since the forward: re-check before they index anything.
  s.count_valid(ignore, "source_labels");
  t.count_valid(ignore, "target_labels");
  const std::array<const CeSide*, 2> sides = {&s, &t};
  const std::array<const std::optional<Tensor>*, 2> gout = {&g0, &g1};
  const int64_t* cnt = counts.data_ptr<int64_t>();
  std::array<Tensor, 2> grads;
  std::array<Tensor, 2> row_g;  // keeps per-row grad_outputs alive (reduction none)
  std::array<const double*, 2> row_scale = {nullptr, nullptr};
  std::array<double, 2> scale{};
  for (int k = 0; k < 2; ++k) {
    const CeSide& d = *sides[k];
    const bool want = mask[k];
    const std::optional<Tensor>& go = reduction == kNone ? *gout[k] : g0;
    if (!want) {
      grads[k] = at::empty({0}, opts);
      continue;
    }
    if (!d.evaluated || !go.has_value() || !go->defined()) {
      grads[k] = at::zeros(d.logits_sizes, opts);
      continue;
    }
    grads[k] = empty_large(d.logits_sizes, opts);
    if (reduction == kNone) {
      TORCH_CHECK_VALUE(go->numel() == d.rows, "grad_output for the ", k == 0 ? "source" : "target",
                        " losses has ", go->numel(), " elements, expected ", d.rows);
      row_g[k] = go->reshape({d.rows}).to(at::kDouble).contiguous();
      row_scale[k] = row_g[k].data_ptr<double>();
      scale[k] = d.weight;
    } else {
      const double gv = go->item<double>();
      scale[k] = gv * (reduction == kMean ? d.weight / double(cnt[k]) : d.weight);
    }
  }
  TORCH_CHECK(lse_s.scalar_type() == at::kDouble && lse_t.scalar_type() == at::kDouble && lse_s.numel() == s.rows &&
                  lse_t.numel() == t.rows,
              "_alpha_weighted_cross_entropy_backward: lse tensors do not match the logits");
  const std::array<Tensor, 2> lse = {lse_s.contiguous(), lse_t.contiguous()};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_backward_cpu", [&] {
    backward_rows<scalar_t>(s, t, ignore, eps, grads, row_scale, scale, lse);
  });
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("alpha_weighted_cross_entropy", &forward_public);
  m.impl("_alpha_weighted_cross_entropy_forward", &forward);
  m.impl("_alpha_weighted_cross_entropy_backward", &backward);
}

}  // namespace fastadapt::cpu
