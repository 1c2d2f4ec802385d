// Schemas of the fused Linear + ReLU ops and their C++ entry points.
#include "linear_relu.h"

#include "register.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // output is relu(x @ weight.T + bias) as the forward returned it: its sign is the ReLU mask, so the
  // pre-activation is never kept. output_mask = (grad_x, grad_weight, grad_bias).
  m.def(
      "_linear_relu_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor output, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

namespace fastadapt::ops {

at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = FASTADAPT_OP_HANDLE(linear_relu);
  return op.call(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _linear_relu_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                                                     const at::Tensor& weight, const at::Tensor& output,
                                                                     std::array<bool, 3> output_mask) {
  static auto op = FASTADAPT_OP_HANDLE(_linear_relu_backward);
  return op.call(grad_output, x, weight, output, output_mask);
}

}  // namespace fastadapt::ops
