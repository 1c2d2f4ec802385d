// Autograd node of the fused Linear + ReLU, in C++ so a training step pays one node and no Python
// autograd overhead (eager Linear + ReLU builds three: addmm, t and relu). Saves x, weight and the
// OUTPUT y, whose sign is the ReLU mask: the pre-activation is never kept. Backward hands everything
// to fastadapt::_linear_relu_backward, so the node is the same for every device.
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "linear_relu.h"
#include "register.h"

namespace fastadapt {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinearReLUNode : public torch::autograd::Function<LinearReLUNode> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
    Tensor y;
    {
      // Straight to the device kernel: calling the op here would re-enter this node.
      at::AutoDispatchBelowADInplaceOrView below;
      y = ops::linear_relu(x, weight, bias);
    }
    ctx->save_for_backward({x, weight, y});
    // Without a bias the node has two input edges, and needs_input_grad(2) would be out of range.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return {Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the autograd fallback, which makes a second backward raise.
      std::tie(gx, gw, gb) = ops::_linear_relu_backward(grads[0], saved[0], saved[1], saved[2], mask);
    } else {
      // The usual backward: the boxed fallback would only redispatch, so skip it.
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gx, gw, gb) = ops::_linear_relu_backward(grads[0], saved[0], saved[1], saved[2], mask);
    }
    return {mask[0] ? gx : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor()};
  }
};

Tensor linear_relu_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  return LinearReLUNode::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, linear_relu, linear_relu_autograd);
  // Internal op: callable, not differentiable (double backward is not supported).
  m.impl("_linear_relu_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
