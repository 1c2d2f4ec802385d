// fastadapt::linear_relu and its backward op, called through the dispatcher: the one place their C++ signatures are
// written. The schemas are in linear_relu.cpp; the device kernels (cpu/, cuda/) and the autograd kernel
// (autograd/) are registered with exactly these types (FASTADAPT_IMPL checks it at compile time).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "register.h"

namespace fastadapt::ops {

// relu(x @ weight.T + bias) for x (..., in_features), weight (out_features, in_features).
inline at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = FASTADAPT_OP_HANDLE(linear_relu);
  return op.call(x, weight, bias);
}

// output is the forward's result (its sign is the ReLU mask); output_mask = (grad_x, grad_weight, grad_bias).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> _linear_relu_backward(const at::Tensor& grad_output,
                                                                            const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& output,
                                                                            std::array<bool, 3> output_mask) {
  static auto op = FASTADAPT_OP_HANDLE(_linear_relu_backward);
  return op.call(grad_output, x, weight, output, output_mask);
}

}  // namespace fastadapt::ops
