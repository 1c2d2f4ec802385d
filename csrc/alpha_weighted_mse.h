// fastadapt::alpha_weighted_mse and its internal forward/backward ops: the one declaration of their
// C++ signatures (schemas and dispatcher calls in alpha_weighted_mse.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "two_sided.h"

namespace fastadapt::ops {

// pred and target of one shape per side; returns (source_term, target_term), already weighted, in the
// accumulation type (two_sided.h).
std::tuple<at::Tensor, at::Tensor> alpha_weighted_mse(const at::Tensor& source_pred, const at::Tensor& source_target,
                                                      const at::Tensor& target_pred, const at::Tensor& target_target,
                                                      const at::Tensor& alpha, int64_t reduction);

// saved is empty: the backward needs nothing but the inputs.
LossForward _alpha_weighted_mse_forward(const at::Tensor& source_pred, const at::Tensor& source_target,
                                        const at::Tensor& target_pred, const at::Tensor& target_target,
                                        const at::Tensor& alpha, int64_t reduction, std::array<bool, 2> write_grad);

// Gradients with respect to each side's prediction; the target's is their negation.
SideGrads _alpha_weighted_mse_backward(const std::optional<at::Tensor>& source_grad_output,
                                       const std::optional<at::Tensor>& target_grad_output,
                                       const at::Tensor& source_pred, const at::Tensor& source_target,
                                       const at::Tensor& target_pred, const at::Tensor& target_target,
                                       const at::Tensor& alpha, at::TensorList saved, int64_t reduction,
                                       std::array<bool, 2> output_mask);

}  // namespace fastadapt::ops
