// Autograd node of the alpha-weighted MSE (C++, no Python autograd overhead). On the CPU with
// reduction mean/sum the forward kernel already wrote d/d pred for a unit grad_output; backward only
// hands it over. The target tensors, when they require grad, get the negation.
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

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, int64_t,
                                                              std::array<bool, 2>);
using BackwardSig = std::tuple<Tensor, Tensor>(const std::optional<Tensor>&, const std::optional<Tensor>&,
                                               const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, int64_t, std::array<bool, 2>);

class AlphaWeightedMse : public torch::autograd::Function<AlphaWeightedMse> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& sp, const Tensor& st, const Tensor& tp,
                               const Tensor& tt, const Tensor& alpha, int64_t reduction) {
    static auto op = op_handle<ForwardSig>("fastadapt::_alpha_weighted_mse_forward");
    const bool write = sp.is_cpu() && reduction != kNone;
    const std::array<bool, 2> wants = {write && (sp.requires_grad() || st.requires_grad()),
                                       write && (tp.requires_grad() || tt.requires_grad())};
    auto [o0, o1, g_s, g_t] = op.call(sp, st, tp, tt, alpha, reduction, wants);
    // Written gradients as SavedVariables: released before the next node unless retain_graph, so
    // AccumulateGrad adopts them without a copy.
    ctx->save_for_backward({sp, st, tp, tt, g_s, g_t});
    ctx->saved_data["written"] = write;
    ctx->saved_data["alpha"] = alpha.detach().clone();
    ctx->saved_data["reduction"] = reduction;
    if (reduction != kNone) ctx->mark_non_differentiable({o1});
    return {o0, o1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need[4] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3)};
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    auto& sd = ctx->saved_data;
    Tensor gs, gt;
    auto saved = ctx->get_saved_variables();
    if (sd["written"].toBool() && !at::GradMode::is_enabled() && grads[0].defined()) {
      if (need[0] || need[1]) gs = scale_saved_grad(saved[4], grads[0]);
      if (need[2] || need[3]) gt = scale_saved_grad(saved[5], grads[0]);
    } else {
      static auto op = op_handle<BackwardSig>("fastadapt::_alpha_weighted_mse_backward");
      // the second output carries no data unless the reduction is none
      const std::optional<Tensor> g0 = if_defined(grads[0]);
      const std::optional<Tensor> g1 = reduction == kNone ? if_defined(grads[1]) : std::nullopt;
      std::tie(gs, gt) = op.call(g0, g1, saved[0], saved[1], saved[2], saved[3], sd["alpha"].toTensor(), reduction,
                                 {need[0] || need[1], need[2] || need[3]});
    }
    // The target's gradient is the negation; the prediction's is handed over without a copy.
    Tensor gst = need[1] ? gs.neg() : Tensor();
    Tensor gtt = need[3] ? gt.neg() : Tensor();
    return {need[0] ? gs : Tensor(), gst, need[2] ? gt : Tensor(), gtt, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> autograd_forward(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                                            const Tensor& alpha, int64_t reduction) {
  auto out = AlphaWeightedMse::apply(sp, st, tp, tt, alpha, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  m.impl("alpha_weighted_mse", &autograd_forward);
  m.impl("_alpha_weighted_mse_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_mse_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
