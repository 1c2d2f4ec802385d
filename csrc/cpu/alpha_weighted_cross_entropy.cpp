// CPU kernels of the alpha-weighted cross-entropy:
//   loss = alpha * CE(target_logits, target_labels) + (1 - alpha) * CE(source_logits, source_labels)
//
// What it fuses: log-sum-exp, the label-smoothed NLL (class indices, optionally class-weighted, or
// probability targets), the per-side mean as F.cross_entropy takes it, the alpha weighting and (on
// request) the gradient for a unit grad_output. Reads each logits row from
// memory once and writes each gradient row once; log_softmax is never materialised. Rows of both
// sides share one at::parallel_for. Per-row losses go to a small buffer and are summed in a fixed
// order, so results do not depend on the thread count.
//
// Why the gradient is written in the forward pass here (the autograd node asks for it with reduction
// mean/sum): on these CPUs the op is bound by exp() throughput and page faults, not DRAM. Writing the
// gradient while the row is still in L2 costs one exp per element; recomputing it in backward costs
// a second exp and a second read of the logits. Measurements: BENCHMARKS.md.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "alpha_weighted_cross_entropy.h"
#include "cpu/grad_buffer.h"
#include "cpu/row_kernels.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;

// A side as the row loops read it: raw pointers (Tensor::data_ptr() checks cost more than a 10-class
// row's arithmetic) and the side's weight.
struct Side : CeSide {
  double weight = 0.0;
  bool evaluated = false;  // weight != 0: a zero-weight side is not read at all
  // class weights or probability targets: rows go through ce_weighted_row, one at a time
  bool weighted = false;
  const void* x = nullptr;
  const int64_t* y = nullptr;  // class indices, or null for probability targets
  const void* t = nullptr;     // probability targets (rows, classes), contiguous, or null
  const void* w = nullptr;     // class weights in the accumulation type, or null

  template <typename T>
  const T* row(int64_t i) const {
    return static_cast<const T*>(x) + i * row_stride;
  }
  int64_t label(int64_t i) const { return y ? y[i] : 0; }
  bool ignored(int64_t i, int64_t ignore) const { return y && y[i] == ignore; }  // never for probabilities
};

Side make_side(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& class_weight, double weight) {
  Side d;
  static_cast<CeSide&>(d) = make_ce_side(logits, labels, class_weight);
  d.weight = weight;
  d.evaluated = weight != 0.0;
  d.weighted = d.soft || d.class_weight.defined();
  d.x = d.logits.const_data_ptr();
  if (d.soft) {
    d.t = d.labels.const_data_ptr();
  } else {
    d.y = d.labels.const_data_ptr<int64_t>();
  }
  if (d.class_weight.defined()) d.w = d.class_weight.const_data_ptr();
  return d;
}

// mean's divisor (two_sided.h), 0 for a side that is not evaluated; checks the labels' range
double denominator(const Side& d, int64_t ignore) { return d.evaluated ? mean_divisor(d, ignore) : 0.0; }

std::array<Side, 2> make_sides(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                               const Tensor& alpha, int64_t reduction, const std::optional<Tensor>& sw,
                               const std::optional<Tensor>& tw) {
  check_two_sided_call(sl, tl, reduction);
  const SideWeights w = cpu_side_weights(alpha);
  return {make_side(sl, sy, sw, *w.w[0]), make_side(tl, ty, tw, *w.w[1])};
}

// A row in the accumulation type: bf16 widened into scratch, float/double as they are.
template <typename scalar_t, typename A = acc_t<scalar_t>>
const A* widened(const scalar_t* row, int64_t n, std::vector<A>& scratch) {
  if constexpr (std::is_same_v<scalar_t, A>) {
    return row;
  } else {
    at::vec::convert(row, scratch.data(), n);
    return scratch.data();
  }
}

// The two sides' rows in one at::parallel_for: blocks of kBlockRows rows of one side are the work
// items; narrow rows are done a block at a time, wide rows one at a time. row_loss[r] gets the
// unweighted loss (0 at ignored or skipped rows); grad[k] is written when it is non-null.
template <typename scalar_t>
void forward_rows(const std::array<Side, 2>& sides, int64_t ignore, double eps, const std::array<scalar_t*, 2>& grad,
                  std::array<double, 2> grad_scale, std::vector<double>& row_loss, const std::array<double*, 2>& lse) {
  using A = acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, A>;
  const auto& f = loss_row_fns<A>();
  const Side &s = sides[0], &t = sides[1];
  const int64_t blocks_s = (s.rows + kBlockRows - 1) / kBlockRows;
  const int64_t blocks = blocks_s + (t.rows + kBlockRows - 1) / kBlockRows;
  const int64_t C = std::max<int64_t>({s.classes, t.classes, 1});
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (C * kBlockRows));
  const bool any_soft = s.soft || t.soft;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t scratch = C <= kSmallClasses ? kBlockRows * C : C;
    std::vector<A> xs(kWiden ? scratch : 0), gs(kWiden ? scratch : 0), ts(kWiden && any_soft ? C : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int side = b < blocks_s ? 0 : 1;
      const Side& d = sides[side];
      const int64_t r0 = (side == 0 ? b : b - blocks_s) * kBlockRows;
      const int64_t n = std::min(kBlockRows, d.rows - r0), Cd = d.classes;
      double* loss = row_loss.data() + (side == 0 ? 0 : s.rows) + r0;
      double* lse_p = lse[side] + r0;
      scalar_t* g = grad[side] ? grad[side] + r0 * Cd : nullptr;
      if (!d.evaluated) {  // a zero-weight side is not read at all
        std::fill(loss, loss + n, 0.0);
        std::fill(lse_p, lse_p + n, 0.0);
        continue;
      }
      const A sc = A(grad_scale[side]);
      if (Cd <= kSmallClasses && !d.weighted) {
        // narrow rows: the whole block at once (bf16 widened into a float scratch block first)
        const A* x;
        int64_t stride;
        if constexpr (kWiden) {
          for (int64_t l = 0; l < n; ++l) at::vec::convert(d.row<scalar_t>(r0 + l), xs.data() + l * Cd, Cd);
          x = xs.data();
          stride = Cd;
        } else {
          x = d.row<scalar_t>(r0);
          stride = d.row_stride;
        }
        A* ga = g ? (kWiden ? gs.data() : reinterpret_cast<A*>(g)) : nullptr;
        f.ce_rows_small(x, stride, Cd, d.y + r0, n, ignore, A(eps), ga, sc, lse_p, loss);
        if constexpr (kWiden) {
          if (g) at::vec::convert(gs.data(), g, n * Cd);
        }
        continue;
      }
      // wide (or weighted) rows one at a time, so each stays in L2 across the passes of ce_row
      for (int64_t l = 0; l < n; ++l) {
        const int64_t i = r0 + l, y = d.label(i);
        scalar_t* gl = g ? g + l * Cd : nullptr;
        if (d.ignored(i, ignore)) {
          loss[l] = 0.0;
          lse_p[l] = 0.0;
          if (gl) std::memset(gl, 0, sizeof(scalar_t) * Cd);
          continue;
        }
        const A* x = widened(d.row<scalar_t>(i), Cd, xs);
        A* ga = gl ? (kWiden ? gs.data() : reinterpret_cast<A*>(gl)) : nullptr;
        if (d.weighted) {
          const A* tr = d.soft ? widened(static_cast<const scalar_t*>(d.t) + i * Cd, Cd, ts) : nullptr;
          loss[l] = f.ce_weighted_row(x, Cd, y, tr, static_cast<const A*>(d.w), A(eps), ga, sc, lse_p + l);
        } else {
          loss[l] = f.ce_row(x, Cd, y, A(eps), ga, sc, lse_p + l);
        }
        if constexpr (kWiden) {
          if (gl) at::vec::convert(gs.data(), gl, Cd);
        }
      }
    }
  });
}

LossForward forward(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                    int64_t ignore, double eps, int64_t reduction, std::optional<Tensor> sw, std::optional<Tensor> tw,
                    std::array<bool, 2> write_grad) {
  const std::array<Side, 2> sides = make_sides(sl, sy, tl, ty, alpha, reduction, sw, tw);
  // Labels are checked before any arithmetic, so a bad label leaves nothing half-written.
  const std::array<double, 2> denom = {denominator(sides[0], ignore), denominator(sides[1], ignore)};
  const auto opts = sl.options();
  std::array<Tensor, 2> lse, grads, terms;
  std::array<double, 2> grad_scale{};
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    lse[k] = at::empty({d.rows}, opts.dtype(at::kDouble));
    grads[k] = grad_buffer(plan_grad(write_grad[k], !d.evaluated), d.logits_sizes, opts, empty_large);
    grad_scale[k] = reduction == kMean ? d.weight / denom[k] : d.weight;
  }
  std::vector<double> row_loss(sides[0].rows + sides[1].rows);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_cpu", [&] {
    auto computed = [&](int k) { return sides[k].evaluated && write_grad[k] ? grads[k].data_ptr<scalar_t>() : nullptr; };
    forward_rows<scalar_t>(sides, ignore, eps, {computed(0), computed(1)}, grad_scale, row_loss,
                           {lse[0].data_ptr<double>(), lse[1].data_ptr<double>()});
  });
  const auto acc = at::toOpMathType(sl.scalar_type());
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    const int64_t offset = k == 0 ? 0 : sides[0].rows;
    if (reduction == kNone) {
      terms[k] = at::empty(d.label_sizes, opts.dtype(acc));
      AT_DISPATCH_FLOATING_TYPES(acc, "awce_none", [&] {
        auto* p = terms[k].data_ptr<scalar_t>();
        for (int64_t i = 0; i < d.rows; ++i) p[i] = d.evaluated ? scalar_t(d.weight * row_loss[offset + i]) : 0;
      });
      continue;
    }
    double sum = 0.0;  // fixed order: the result does not depend on the thread count
    for (int64_t i = 0; i < d.rows; ++i) sum += row_loss[offset + i];
    // a zero-weight term is not evaluated: no NaN from an empty side's mean
    const double term = !d.evaluated ? 0.0 : reduction == kMean ? d.weight * (sum / denom[k]) : d.weight * sum;
    terms[k] = at::scalar_tensor(term, opts.dtype(acc));
  }
  Tensor den = at::empty({2}, opts.dtype(at::kDouble));
  den.data_ptr<double>()[0] = denom[0];
  den.data_ptr<double>()[1] = denom[1];
  return {terms[0], terms[1], {lse[0], lse[1], den}, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                          const Tensor& alpha, int64_t ignore, double eps, int64_t reduction,
                                          std::optional<Tensor> sw, std::optional<Tensor> tw) {
  auto out = forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, std::move(sw), std::move(tw), {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

// Rows of the sides whose gradient is computed (grad[k] non-null) from the saved log-sum-exp.
// row_scale[k] (nullable) holds per-row grad_outputs (reduction none), multiplied by scale[k].
template <typename scalar_t>
void backward_rows(const std::array<Side, 2>& sides, int64_t ignore, double eps, const std::array<scalar_t*, 2>& grad,
                   const std::array<const double*, 2>& row_scale, std::array<double, 2> scale,
                   const std::array<const double*, 2>& lse) {
  using A = acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, A>;
  const auto& f = loss_row_fns<A>();
  const Side &s = sides[0], &t = sides[1];
  const int64_t C = std::max(s.classes, t.classes);
  const bool any_soft = s.soft || t.soft;
  at::parallel_for(0, s.rows + t.rows, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> xs(kWiden ? C : 0), gs(kWiden ? C : 0), ts(kWiden && any_soft ? C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int side = r < s.rows ? 0 : 1;
      if (grad[side] == nullptr) continue;
      const Side& d = sides[side];
      const int64_t i = side == 0 ? r : r - s.rows;
      const int64_t Cd = d.classes, y = d.label(i);
      scalar_t* grow = grad[side] + i * Cd;
      if (d.ignored(i, ignore)) {
        std::memset(grow, 0, sizeof(scalar_t) * Cd);
        continue;
      }
      const A k = A(row_scale[side] ? row_scale[side][i] * scale[side] : scale[side]);
      const A* x = widened(d.row<scalar_t>(i), Cd, xs);
      A* ga = kWiden ? gs.data() : reinterpret_cast<A*>(grow);
      if (d.weighted) {
        const A* tr = d.soft ? widened(static_cast<const scalar_t*>(d.t) + i * Cd, Cd, ts) : nullptr;
        f.ce_weighted_grad_row(x, Cd, y, tr, static_cast<const A*>(d.w), A(eps), lse[side][i], k, ga);
      } else {
        f.ce_grad_row(x, Cd, y, A(eps), lse[side][i], k, ga);
      }
      if constexpr (kWiden) at::vec::convert(gs.data(), grow, Cd);
    }
  });
}

SideGrads backward(const std::optional<Tensor>& g_s, const std::optional<Tensor>& g_t, const Tensor& sl,
                   const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha, at::TensorList saved,
                   int64_t ignore, double eps, int64_t reduction, std::optional<Tensor> sw, std::optional<Tensor> tw,
                   std::array<bool, 2> mask) {
  const std::array<Side, 2> sides = make_sides(sl, sy, tl, ty, alpha, reduction, sw, tw);
  TORCH_CHECK(saved.size() == 3 && saved[2].numel() == 2, "saved must be the forward's {lse, lse, denominators}");
  // Labels may have been changed in place since the forward: re-checked before they index anything.
  denominator(sides[0], ignore);
  denominator(sides[1], ignore);
  const std::array<const std::optional<Tensor>*, 2> gout = {&g_s, &g_t};
  const Tensor denoms = saved[2].to(at::kCPU, at::kDouble).contiguous();
  const double* denom = denoms.const_data_ptr<double>();
  const auto opts = sl.options();
  std::array<Tensor, 2> grads, lse, row_g;  // row_g keeps per-row grad_outputs alive (reduction none)
  std::array<const double*, 2> row_scale = {nullptr, nullptr};
  std::array<double, 2> scale{};
  std::array<bool, 2> run{};
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    const std::optional<Tensor>& go = *gout[k];
    const GradPlan plan = plan_grad(mask[k], !d.evaluated, go.has_value() && go->defined());
    grads[k] = grad_buffer(plan, d.logits_sizes, opts, empty_large);
    run[k] = plan == GradPlan::kCompute;
    if (!run[k]) continue;
    lse[k] = saved[k].to(at::kDouble).contiguous();
    TORCH_CHECK(lse[k].numel() == d.rows, "saved lse does not match the logits");
    if (reduction == kNone) {
      TORCH_CHECK(go->numel() == d.rows, "grad_output of a per-row loss must have one element per row");
      row_g[k] = go->reshape({d.rows}).to(at::kDouble).contiguous();
      row_scale[k] = row_g[k].const_data_ptr<double>();
      scale[k] = d.weight;
    } else {
      TORCH_CHECK(go->numel() == 1, "grad_output of a reduced loss must have one element");
      scale[k] = go->item<double>() * (reduction == kMean ? d.weight / denom[k] : d.weight);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_backward_cpu", [&] {
    auto computed = [&](int k) { return run[k] ? grads[k].data_ptr<scalar_t>() : nullptr; };
    auto lse_of = [&](int k) { return run[k] ? lse[k].const_data_ptr<double>() : nullptr; };
    backward_rows<scalar_t>(sides, ignore, eps, {computed(0), computed(1)}, row_scale, scale, {lse_of(0), lse_of(1)});
  });
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, alpha_weighted_cross_entropy, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_cross_entropy_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_cross_entropy_backward, backward);
}

}  // namespace fastadapt::cpu
