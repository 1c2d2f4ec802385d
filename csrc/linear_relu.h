// fastadapt::linear_relu and its backward op: the one declaration of their C++ signatures (schemas
// and dispatcher calls in linear_relu.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastadapt::ops {

// relu(x @ weight.T + bias) for x (..., in_features), weight (out_features, in_features).
at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// output is the forward's result (its sign is the ReLU mask); output_mask = (grad_x, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> _linear_relu_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                                                     const at::Tensor& weight, const at::Tensor& output,
                                                                     std::array<bool, 3> output_mask);

}  // namespace fastadapt::ops
