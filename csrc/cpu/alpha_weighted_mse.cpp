// CPU kernels of the alpha-weighted MSE:
//   loss = alpha * mean((target_pred - target_target)^2) + (1 - alpha) * mean((source_pred - source_target)^2)
//
// What it fuses: the difference, the square, the per-side reduction, the alpha weighting and (on
// request) the gradient 2w(x-y)/n for a unit grad_output. One pass reads pred and target once and
// writes the gradient once; eager PyTorch makes about five passes and three temporaries. Both sides
// are cut into fixed-size chunks that share one at::parallel_for; the per-chunk sums are added in
// chunk order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "alpha_weighted_mse.h"
#include "cpu/grad_buffer.h"
#include "cpu/row_kernels.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;
constexpr int64_t kChunk = 16384;  // elements per task: fits L1/L2 for the bf16 widening buffers

struct Side : MseSide {
  int64_t chunks = 0;
  double weight = 0.0;
  bool evaluated = false;  // weight != 0: a zero-weight side is not read at all
};

std::array<Side, 2> make_sides(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                               const Tensor& alpha, int64_t reduction) {
  check_two_sided_call(sp, tp, reduction);
  const SideWeights w = cpu_side_weights(alpha);
  std::array<Side, 2> sides;
  const std::array<std::pair<const Tensor*, const Tensor*>, 2> in = {{{&sp, &st}, {&tp, &tt}}};
  for (int k = 0; k < 2; ++k) {
    static_cast<MseSide&>(sides[k]) = make_mse_side(*in[k].first, *in[k].second);
    sides[k].chunks = (sides[k].n + kChunk - 1) / kChunk;
    sides[k].weight = *w.w[k];
    sides[k].evaluated = sides[k].weight != 0.0;
  }
  return sides;
}

// One pass over the sides with compute[k] set: chunk sums into partial[], optional grad = scale*(x-y),
// optional elem = w*(x-y)^2 (in the accumulation type, as the op returns its terms). The other sides
// are not read (their partial sums are 0).
template <typename scalar_t, typename A = acc_t<scalar_t>>
void run_chunks(const std::array<Side, 2>& sides, const std::array<bool, 2>& compute,
                const std::array<scalar_t*, 2>& grad, std::array<double, 2> scale, const std::array<A*, 2>& elem,
                std::vector<double>& partial) {
  constexpr bool kWiden = !std::is_same_v<scalar_t, A>;
  const auto& f = loss_row_fns<A>();
  const int64_t total = sides[0].chunks + sides[1].chunks;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> xs(kWiden ? kChunk : 0), ys(kWiden ? kChunk : 0), gs(kWiden ? kChunk : 0);
    for (int64_t c = begin; c < end; ++c) {
      const int k = c < sides[0].chunks ? 0 : 1;
      const Side& s = sides[k];
      partial[c] = 0.0;
      if (!compute[k]) continue;
      const int64_t off = (k == 0 ? c : c - sides[0].chunks) * kChunk, len = std::min(kChunk, s.n - off);
      const scalar_t* x = s.pred.const_data_ptr<scalar_t>() + off;
      const scalar_t* y = s.target.const_data_ptr<scalar_t>() + off;
      scalar_t* g = grad[k] ? grad[k] + off : nullptr;
      A* e = elem[k] ? elem[k] + off : nullptr;
      if constexpr (kWiden) {
        at::vec::convert(x, xs.data(), len);
        at::vec::convert(y, ys.data(), len);
        partial[c] = f.mse_chunk(xs.data(), ys.data(), len, g ? gs.data() : nullptr, A(scale[k]), e, A(s.weight));
        if (g) at::vec::convert(gs.data(), g, len);
      } else {
        partial[c] = f.mse_chunk(x, y, len, g, A(scale[k]), e, A(s.weight));
      }
    }
  });
}

LossForward forward(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha,
                    int64_t reduction, std::array<bool, 2> write_grad) {
  const std::array<Side, 2> sides = make_sides(sp, st, tp, tt, alpha, reduction);
  const auto opts = sp.options();
  const auto acc = at::toOpMathType(sp.scalar_type());
  std::array<Tensor, 2> grads, elem;
  std::array<double, 2> scale{};
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    scale[k] = 2.0 * d.weight / (reduction == kMean ? double(d.n) : 1.0);
    grads[k] = grad_buffer(plan_grad(write_grad[k], !d.evaluated), d.sizes, opts, empty_large);
    // reduction none: the weighted squared errors, written in the same pass (zeros for a skipped side)
    elem[k] = grad_buffer(plan_grad(reduction == kNone, !d.evaluated), d.sizes, opts.dtype(acc), empty_tensor);
  }
  const std::array<bool, 2> compute = {sides[0].evaluated, sides[1].evaluated};
  std::vector<double> partial(sides[0].chunks + sides[1].chunks);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sp.scalar_type(), "alpha_weighted_mse_cpu", [&] {
    using A = acc_t<scalar_t>;
    auto grad_ptr = [&](int k) { return compute[k] && grads[k].numel() ? grads[k].data_ptr<scalar_t>() : nullptr; };
    auto elem_ptr = [&](int k) { return compute[k] && elem[k].numel() ? elem[k].data_ptr<A>() : nullptr; };
    run_chunks<scalar_t>(sides, compute, {grad_ptr(0), grad_ptr(1)}, scale, {elem_ptr(0), elem_ptr(1)}, partial);
  });
  if (reduction == kNone) return {elem[0], elem[1], {}, grads[0], grads[1]};
  std::array<Tensor, 2> terms;
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    const int64_t first = k == 0 ? 0 : sides[0].chunks;
    double sum = 0.0;  // chunk order: the result does not depend on the thread count
    for (int64_t i = 0; i < d.chunks; ++i) sum += partial[first + i];
    // a zero-weight term is not evaluated: no NaN from an empty side's mean
    const double term = !d.evaluated ? 0.0 : d.weight * (reduction == kMean ? sum / double(d.n) : sum);
    terms[k] = at::scalar_tensor(term, opts.dtype(acc));
  }
  return {terms[0], terms[1], {}, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                                          const Tensor& alpha, int64_t reduction) {
  auto out = forward(sp, st, tp, tt, alpha, reduction, {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

// d loss / d pred for each side (the autograd node negates it for the target tensors).
SideGrads backward(const std::optional<Tensor>& g_s, const std::optional<Tensor>& g_t, const Tensor& sp,
                   const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha, at::TensorList saved,
                   int64_t reduction, std::array<bool, 2> mask) {
  const std::array<Side, 2> sides = make_sides(sp, st, tp, tt, alpha, reduction);
  TORCH_CHECK(saved.empty(), "saved must be the forward's (empty) list");
  const std::array<const std::optional<Tensor>*, 2> gout = {&g_s, &g_t};
  const auto opts = sp.options();
  const auto acc = at::toOpMathType(sp.scalar_type());
  std::array<Tensor, 2> grads;
  std::array<double, 2> scale{};
  std::array<bool, 2> fused{};  // sides the fused pass writes (a scalar grad_output)
  for (int k = 0; k < 2; ++k) {
    const Side& d = sides[k];
    const std::optional<Tensor>& go = *gout[k];
    const GradPlan plan = plan_grad(mask[k], !d.evaluated, go.has_value() && go->defined());
    if (plan == GradPlan::kCompute && reduction == kNone) {
      // per-element grad_output: 2w * g * (x - y), in the accumulation type, rounded once
      TORCH_CHECK(go->numel() == d.n, "grad_output of a per-element loss must have one element per element");
      const Tensor diff = at::sub(d.pred.to(acc), d.target.to(acc));
      grads[k] = at::mul(at::mul(diff, go->reshape({-1}).to(acc)), 2.0 * d.weight).to(sp.scalar_type()).view(d.sizes);
      continue;
    }
    grads[k] = grad_buffer(plan, d.sizes, opts, empty_large);
    fused[k] = plan == GradPlan::kCompute;
    if (fused[k]) {
      TORCH_CHECK(go->numel() == 1, "grad_output of a reduced loss must have one element");
      scale[k] = go->item<double>() * 2.0 * d.weight / (reduction == kMean ? double(d.n) : 1.0);
    }
  }
  if (fused[0] || fused[1]) {
    std::vector<double> partial(sides[0].chunks + sides[1].chunks);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sp.scalar_type(), "alpha_weighted_mse_backward_cpu", [&] {
      auto ptr = [&](int k) { return fused[k] ? grads[k].data_ptr<scalar_t>() : nullptr; };
      run_chunks<scalar_t>(sides, fused, {ptr(0), ptr(1)}, scale, {nullptr, nullptr}, partial);
    });
  }
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, alpha_weighted_mse, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_mse_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_mse_backward, backward);
}

}  // namespace fastadapt::cpu
