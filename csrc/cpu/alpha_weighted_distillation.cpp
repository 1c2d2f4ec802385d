// CPU kernels of the alpha-weighted distillation (csrc/alpha_weighted_distillation.h):
//   loss = alpha * CE(z, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(z[:, :K] / T))
//
// What it fuses: the three log-sum-exps (z, z[:K] / T, t / T), the label-smoothed NLL, the KL, both
// reductions, the alpha and T^2 weighting and (on request) the gradient for a unit grad_output
// (alpha * dCE/dz + (1 - alpha) * T * (p - q), with the means' divisors). Reads each row of z and t
// from memory once and writes each gradient row once; neither softmax is materialised (the
// exponentials of a row live in an L2 scratch row: cpu/vec/distill_rows_impl.h). Per-row losses go to
// a buffer summed in a fixed order, so results do not depend on the thread count.
//
// The gradient is written during the forward for the same reason as the cross-entropy's
// (csrc/cpu/alpha_weighted_cross_entropy.cpp): exp() throughput and page faults bound these CPUs, and
// recomputing in backward costs every exponential and both reads a second time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "alpha_weighted_distillation.h"
#include "cpu/grad_buffer.h"
#include "cpu/row_kernels.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;

// A call as the row loops read it: raw pointers and the terms' weights (distillation 1 - alpha,
// cross-entropy alpha); a zero-weight term is not read at all.
struct Call : DistillCall {
  double w_kd = 0.0, w_ce = 0.0;
  bool kd = false, ce = false;
  int64_t valid = 0;  // non-ignored labels (0 when the cross-entropy is not evaluated)
  const void* z = nullptr;
  const void* t = nullptr;
  const int64_t* y = nullptr;
};

Call make_call(const Tensor& logits, const Tensor& labels, const Tensor& teacher, const Tensor& alpha,
               double temperature, int64_t ignore, int64_t reduction) {
  Call c;
  static_cast<DistillCall&>(c) = make_distill_call(logits, labels, teacher, temperature, reduction);
  const SideWeights w = cpu_side_weights(alpha);
  c.w_kd = *w.w[0];
  c.w_ce = *w.w[1];
  c.kd = c.w_kd != 0.0;
  c.ce = c.w_ce != 0.0;
  // Labels are checked before any arithmetic, so a bad label leaves nothing half-written.
  c.valid = c.ce ? static_cast<int64_t>(mean_divisor(c.student, ignore)) : 0;  // a count: no weights
  c.z = c.student.logits.const_data_ptr();
  c.t = c.teacher.const_data_ptr();
  c.y = c.student.labels.const_data_ptr<int64_t>();
  return c;
}

// Per-row gradient weights: one value for every row (scale), or per-row grad_outputs (rows, nullable)
// times scale (reduction none).
struct RowScale {
  bool on = false;  // the term has a grad_output
  double scale = 0.0;
  const double* rows = nullptr;
  double at(int64_t i) const { return rows ? rows[i] * scale : scale; }
};

// Every row through `fn(row, i, grad_row)`: row is the row's DistillRow, null for a row with no evaluated
// term (whose gradient row, when there is one, is zeroed here); grad_row is where fn writes the row's
// gradient in the accumulation type, null when none is asked for.
template <typename scalar_t, typename Fn>
void for_rows(const Call& c, int64_t ignore, double temperature, double eps, RowScale ce_scale, RowScale kd_scale,
              scalar_t* grad, const Fn& fn) {
  using A = acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, A>;
  const int64_t rows = c.student.rows, C = c.student.classes, K = c.teacher_classes;
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    // bf16 rows are widened into float scratch rows; the gradient is rounded once, from float
    std::vector<A> zs(kWiden ? C : 0), ts(kWiden ? K : 0), gs(kWiden ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      const bool ce = c.ce && c.y[i] != ignore;
      scalar_t* g = grad ? grad + i * C : nullptr;
      if (!ce && !c.kd) {
        fn(nullptr, i, nullptr);
        if (g) std::memset(g, 0, sizeof(scalar_t) * C);
        continue;
      }
      const scalar_t* z = static_cast<const scalar_t*>(c.z) + i * c.student.row_stride;
      const scalar_t* t = c.kd ? static_cast<const scalar_t*>(c.t) + i * c.teacher_row_stride : nullptr;
      DistillRow<A> r{nullptr, C, nullptr, K, ce ? c.y[i] : -1, A(1.0 / temperature), A(eps),
                      A(ce ? ce_scale.at(i) : 0.0), A(c.kd ? kd_scale.at(i) : 0.0)};
      if constexpr (kWiden) {
        at::vec::convert(z, zs.data(), C);
        if (t) at::vec::convert(t, ts.data(), K);
        r.z = zs.data();
        r.t = t ? ts.data() : nullptr;
        fn(&r, i, g ? gs.data() : nullptr);
        if (g) at::vec::convert(gs.data(), g, C);
      } else {
        r.z = z;
        r.t = t;
        fn(&r, i, g);
      }
    }
  });
}

using DistillForward = std::tuple<Tensor, Tensor, std::vector<Tensor>, Tensor>;

DistillForward forward(const Tensor& logits, const Tensor& labels, const Tensor& teacher, const Tensor& alpha,
                       double temperature, int64_t ignore, double eps, int64_t reduction, bool write_grad) {
  const Call c = make_call(logits, labels, teacher, alpha, temperature, ignore, reduction);
  const int64_t rows = c.student.rows;
  const auto opts = logits.options();
  Tensor stats = at::empty({rows, 3}, opts.dtype(at::kDouble));
  Tensor grad = grad_buffer(plan_grad(write_grad, false), c.student.logits_sizes, opts, empty_large);
  // gradient scales for a unit grad_output; the means divide by the non-ignored rows (CE) and by all
  // rows (KL, "batchmean")
  const bool mean = reduction == kMean;
  const RowScale ce_scale{true, mean ? c.w_ce / double(c.valid) : c.w_ce};
  const RowScale kd_scale{true, (mean ? c.w_kd / double(rows) : c.w_kd) * temperature};
  std::vector<double> ce_loss(rows), kl(rows);
  double* st = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "alpha_weighted_distillation_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto& f = distill_row_fns<A>();
    scalar_t* g = write_grad ? grad.data_ptr<scalar_t>() : nullptr;
    for_rows<scalar_t>(c, ignore, temperature, eps, ce_scale, kd_scale, g,
                       [&](const DistillRow<A>* r, int64_t i, A* gi) {
                         if (r == nullptr) {
                           st[3 * i] = st[3 * i + 1] = st[3 * i + 2] = ce_loss[i] = kl[i] = 0.0;
                           return;
                         }
                         f.row(*r, gi, st + 3 * i, &ce_loss[i], &kl[i]);
                       });
  });
  const auto acc = at::toOpMathType(logits.scalar_type());
  const double t2 = temperature * temperature;
  Tensor kd_term, ce_term;
  if (reduction == kNone) {
    kd_term = at::empty(c.student.label_sizes, opts.dtype(acc));
    ce_term = at::empty(c.student.label_sizes, opts.dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "awd_none", [&] {
      auto* pk = kd_term.data_ptr<scalar_t>();
      auto* pc = ce_term.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) {
        pk[i] = c.kd ? scalar_t(c.w_kd * t2 * kl[i]) : scalar_t(0);
        pc[i] = c.ce ? scalar_t(c.w_ce * ce_loss[i]) : scalar_t(0);
      }
    });
  } else {
    double sum_kl = 0.0, sum_ce = 0.0;  // fixed order: the result does not depend on the thread count
    for (int64_t i = 0; i < rows; ++i) {
      sum_kl += kl[i];
      sum_ce += ce_loss[i];
    }
    // a zero-weight term is not evaluated: no NaN from an empty or all-ignored mean
    const double kd_v = !c.kd ? 0.0 : c.w_kd * t2 * (mean ? sum_kl / double(rows) : sum_kl);
    const double ce_v = !c.ce ? 0.0 : c.w_ce * (mean ? sum_ce / double(c.valid) : sum_ce);
    kd_term = at::scalar_tensor(kd_v, opts.dtype(acc));
    ce_term = at::scalar_tensor(ce_v, opts.dtype(acc));
  }
  Tensor count = at::empty({1}, opts.dtype(at::kLong));
  count.data_ptr<int64_t>()[0] = c.valid;
  return {kd_term, ce_term, {stats, count}, grad};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& logits, const Tensor& labels, const Tensor& teacher,
                                          const Tensor& alpha, double temperature, int64_t ignore, double eps,
                                          int64_t reduction) {
  auto out = forward(logits, labels, teacher, alpha, temperature, ignore, eps, reduction, false);
  return {std::get<0>(out), std::get<1>(out)};
}

// A term's gradient weight from its grad_output: per row for reduction none (held in `keep`), else one
// value; `divisor` is the term's mean divisor. An absent grad_output leaves the term out (weight 0).
RowScale grad_scale(const std::optional<Tensor>& go, double weight, int64_t rows, int64_t reduction, double divisor,
                    Tensor& keep) {
  RowScale s;
  if (!go.has_value() || !go->defined()) return s;
  s.on = true;
  if (reduction == kNone) {
    TORCH_CHECK(go->numel() == rows, "grad_output of a per-row loss must have one element per row");
    keep = go->reshape({rows}).to(at::kDouble).contiguous();
    s.rows = keep.const_data_ptr<double>();
    s.scale = weight;
  } else {
    TORCH_CHECK(go->numel() == 1, "grad_output of a reduced loss must have one element");
    s.scale = go->item<double>() * (reduction == kMean ? weight / divisor : weight);
  }
  return s;
}

Tensor backward(const std::optional<Tensor>& g_kd, const std::optional<Tensor>& g_ce, const Tensor& logits,
                const Tensor& labels, const Tensor& teacher, const Tensor& alpha, at::TensorList saved,
                double temperature, int64_t ignore, double eps, int64_t reduction) {
  Call c = make_call(logits, labels, teacher, alpha, temperature, ignore, reduction);
  const int64_t rows = c.student.rows;
  TORCH_CHECK(saved.size() == 2 && saved[0].numel() == 3 * rows && saved[1].numel() == 1,
              "saved must be the forward's {stats, count}");
  const Tensor stats = saved[0].to(at::kDouble).contiguous();
  const int64_t valid = saved[1].to(at::kCPU, at::kLong).item<int64_t>();
  Tensor keep_kd, keep_ce;
  const RowScale kd_scale = grad_scale(g_kd, c.w_kd * temperature, rows, reduction, double(rows), keep_kd);
  const RowScale ce_scale = grad_scale(g_ce, c.w_ce, rows, reduction, double(valid), keep_ce);
  // a term without a grad_output is left out of this gradient, as a zero-weight term
  c.kd = c.kd && kd_scale.on;
  c.ce = c.ce && ce_scale.on;
  const auto opts = logits.options();
  if (!c.kd && !c.ce) return at::zeros(c.student.logits_sizes, opts);
  Tensor grad = empty_large(c.student.logits_sizes, opts);
  const double* st = stats.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "alpha_weighted_distillation_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto& f = distill_row_fns<A>();
    for_rows<scalar_t>(c, ignore, temperature, eps, ce_scale, kd_scale, grad.data_ptr<scalar_t>(),
                       [&](const DistillRow<A>* r, int64_t i, A* gi) {
                         if (r != nullptr) f.grad_row(*r, st + 3 * i, gi);
                       });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, alpha_weighted_distillation, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_distillation_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_distillation_backward, backward);
}

}  // namespace fastadapt::cpu
