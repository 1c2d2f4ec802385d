// Autograd of the fused linear + alpha-weighted cross-entropy (issue 13, work in progress). The forward
// op writes every wanted gradient for a unit grad_output (cpu/alpha_weighted_linear_cross_entropy.cpp
// says why); backward only scales them by the loss's grad_output and rounds them to the inputs' dtype.
// No backward op exists: double backward is not supported, and a bf16 hidden gradient scaled by a
// grad_output other than 1 is rounded twice (NOTES-issue13.md lists it).
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <tuple>

#include "alpha_weighted_linear_cross_entropy.h"
#include "autograd/util.h"
#include "register.h"

namespace fastadapt {

struct AlphaWeightedLinearCrossEntropy : torch::autograd::Function<AlphaWeightedLinearCrossEntropy> {
  // ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_size
  using Options = std::tuple<int64_t, double, int64_t, double, std::optional<double>, int64_t>;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& sh,
                                                const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                                                const at::Tensor& w, const std::optional<at::Tensor>& b,
                                                const at::Tensor& alpha, const Options& options) {
    const bool has_b = b.has_value() && b->defined();
    // a frozen head (weight without grad) asks for no weight gradient: its GEMM is skipped
    const std::array<bool, 4> want = {sh.requires_grad(), th.requires_grad(), w.requires_grad(),
                                      has_b && b->requires_grad()};
    auto [loss, gs, gt, gw, gb] = std::apply(
        [&](auto... opt) {
          return ops::_alpha_weighted_linear_cross_entropy_forward(sh, sy, th, ty, w, b, alpha, opt..., want);
        },
        options);
    // SavedVariables, released before the next node runs (unless retain_graph)
    ctx->save_for_backward({gs, gt, gw, gb});
    ctx->saved_data["dtype"] = static_cast<int64_t>(w.scalar_type());
    return {loss};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const at::Tensor& go = grads[0];
    // (grads of: source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, options)
    torch::autograd::variable_list out(8);
    if (!go.defined()) return out;
    auto scaled = [&](int input, const at::Tensor& g) {
      return ctx->needs_input_grad(input) ? scale_saved_grad(g, go).to(dtype) : at::Tensor();
    };
    out[0] = scaled(0, v[0]);
    out[2] = scaled(2, v[1]);
    out[4] = scaled(4, v[2]);
    out[5] = scaled(5, v[3]);
    return out;
  }
};

at::Tensor autograd_kernel(const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                           const at::Tensor& w, const std::optional<at::Tensor>& b, const at::Tensor& alpha,
                           int64_t ignore_index, double label_smoothing, int64_t reduction, double z_loss,
                           std::optional<double> softcap, int64_t chunk_size) {
  return AlphaWeightedLinearCrossEntropy::apply(
      sh, sy, th, ty, w, b, alpha,
      AlphaWeightedLinearCrossEntropy::Options(ignore_index, label_smoothing, reduction, z_loss, softcap,
                                               chunk_size))[0];
}

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_linear_cross_entropy, autograd_kernel);
  // Internal op: callable, not differentiable.
  m.impl("_alpha_weighted_linear_cross_entropy_forward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
