// Autograd node of the alpha-weighted cross-entropy, in C++ so a training step pays no Python
// autograd overhead. On the CPU with reduction mean/sum the forward kernel already wrote the gradient
// for a unit grad_output; backward only hands it over (scaled in place if grad_output != 1). On CUDA,
// or for reduction none, backward reads the logits once more and writes the gradient once.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "autograd_util.h"
#include "loss_common.h"

namespace fastadapt {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double, int64_t,
    std::array<bool, 2>);
using BackwardSig = std::tuple<Tensor, Tensor>(const std::optional<Tensor>&, const std::optional<Tensor>&,
                                               const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                               double, int64_t, std::array<bool, 2>);

class AlphaWeightedCrossEntropy : public torch::autograd::Function<AlphaWeightedCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& sl, const Tensor& sy, const Tensor& tl,
                               const Tensor& ty, const Tensor& alpha, int64_t ignore, double eps, int64_t reduction) {
    static auto op = op_handle<ForwardSig>("fastadapt::_alpha_weighted_cross_entropy_forward");
    const bool write = sl.is_cpu() && reduction != kNone;
    const std::array<bool, 2> wants = {write && sl.requires_grad(), write && tl.requires_grad()};
    auto [o0, o1, lse_s, lse_t, counts, g_s, g_t] = op.call(sl, sy, tl, ty, alpha, ignore, eps, reduction, wants);
    // The written gradients are saved as SavedVariables, not in saved_data: autograd releases those
    // before the next node runs (unless retain_graph), so AccumulateGrad adopts them without a copy.
    ctx->save_for_backward({sl, sy, tl, ty, g_s, g_t});
    ctx->saved_data["written"] = write;
    ctx->saved_data["alpha"] = alpha.detach().clone();  // a schedule may change alpha in place before backward
    ctx->saved_data["lse_s"] = lse_s;
    ctx->saved_data["lse_t"] = lse_t;
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["ignore"] = ignore;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["reduction"] = reduction;
    if (reduction != kNone) ctx->mark_non_differentiable({o1});
    return {o0, o1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need_s = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(2);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    Tensor gs, gt;
    auto& sd = ctx->saved_data;
    auto saved = ctx->get_saved_variables();
    // create_graph=True needs a differentiable backward: the op path raises a clear error there.
    if (sd["written"].toBool() && !at::GradMode::is_enabled() && grads[0].defined()) {
      if (need_s) gs = scale_saved_grad(saved[4], grads[0]);
      if (need_t) gt = scale_saved_grad(saved[5], grads[0]);
    } else {
      static auto op = op_handle<BackwardSig>("fastadapt::_alpha_weighted_cross_entropy_backward");
      const std::array<bool, 2> mask = {need_s, need_t};
      // the second output carries no data unless the reduction is none
      const std::optional<Tensor> g0 = if_defined(grads[0]);
      const std::optional<Tensor> g1 = reduction == kNone ? if_defined(grads[1]) : std::nullopt;
      std::tie(gs, gt) = op.call(g0, g1, saved[0], saved[1], saved[2], saved[3], sd["alpha"].toTensor(),
                                 sd["lse_s"].toTensor(), sd["lse_t"].toTensor(), sd["counts"].toTensor(),
                                 sd["ignore"].toInt(), sd["eps"].toDouble(), reduction, mask);
      if (!need_s) gs = Tensor();
      if (!need_t) gt = Tensor();
    }
    return {gs, Tensor(), gt, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> autograd_forward(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                            const Tensor& alpha, int64_t ignore, double eps, int64_t reduction) {
  auto out = AlphaWeightedCrossEntropy::apply(sl, sy, tl, ty, alpha, ignore, eps, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  m.impl("alpha_weighted_cross_entropy", &autograd_forward);
  // Internal ops: callable, not differentiable (double backward is not supported).
  m.impl("_alpha_weighted_cross_entropy_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
