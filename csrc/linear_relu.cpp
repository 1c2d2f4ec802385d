// Schemas of the fused Linear + ReLU ops (their C++ entry points are in the header).
#include "linear_relu.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // output is relu(x @ weight.T + bias) as the forward returned it: its sign is the ReLU mask, so the
  // pre-activation is never kept. output_mask = (grad_x, grad_weight, grad_bias).
  m.def(
      "_linear_relu_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor output, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}
