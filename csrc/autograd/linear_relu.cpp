// Autograd node of the fused Linear + ReLU, in C++ so a training step pays one node and no Python
// autograd overhead (eager Linear + ReLU builds three: addmm, t and relu). Saves x, weight and the
// OUTPUT y, whose sign is the ReLU mask: the pre-activation is never kept. Backward hands everything
// to fastadapt::_linear_relu_backward, so the node is the same for every device.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "autograd_util.h"

namespace fastadapt {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       std::array<bool, 3>);

class LinearReLU : public torch::autograd::Function<LinearReLU> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
    static auto op = op_handle<ForwardSig>("fastadapt::linear_relu");
    Tensor y;
    {
      // Straight to the device kernel: calling the op here would re-enter this node.
      at::AutoDispatchBelowADInplaceOrView below;
      y = op.call(x, weight, bias);
    }
    ctx->save_for_backward({x, weight, y});
    // Without a bias the node has two input edges, and needs_input_grad(2) would be out of range.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<BackwardSig>("fastadapt::_linear_relu_backward");
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return {Tensor(), Tensor(), Tensor()};
    auto saved = ctx->get_saved_variables();
    Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the autograd fallback, which makes a second backward raise.
      std::tie(gx, gw, gb) = op.call(grads[0], saved[0], saved[1], saved[2], mask);
    } else {
      // The usual backward: the boxed fallback would only redispatch, so skip it.
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gx, gw, gb) = op.call(grads[0], saved[0], saved[1], saved[2], mask);
    }
    return {mask[0] ? gx : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor()};
  }
};

Tensor autograd_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return LinearReLU::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  m.impl("linear_relu", &autograd_forward);
  // Internal op: callable, not differentiable (double backward is not supported).
  m.impl("_linear_relu_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
