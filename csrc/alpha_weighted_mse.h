// fastadapt::alpha_weighted_mse and its internal forward/backward ops, called through the dispatcher: the one place their C++ signatures are
// written. The schemas are in alpha_weighted_mse.cpp; the device kernels (cpu/, cuda/) and the autograd kernel
// (autograd/) are registered with exactly these types (FASTADAPT_IMPL checks it at compile time).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "register.h"
#include "two_sided.h"

namespace fastadapt::ops {

// pred and target of one shape per side; returns (source_term, target_term), already weighted, in the
// accumulation type (two_sided.h).
inline std::tuple<at::Tensor, at::Tensor> alpha_weighted_mse(const at::Tensor& source_pred,
                                                             const at::Tensor& source_target,
                                                             const at::Tensor& target_pred,
                                                             const at::Tensor& target_target, const at::Tensor& alpha,
                                                             int64_t reduction) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_mse);
  return op.call(source_pred, source_target, target_pred, target_target, alpha, reduction);
}

// saved is empty: the backward needs nothing but the inputs.
inline LossForward _alpha_weighted_mse_forward(const at::Tensor& source_pred, const at::Tensor& source_target,
                                               const at::Tensor& target_pred, const at::Tensor& target_target,
                                               const at::Tensor& alpha, int64_t reduction,
                                               std::array<bool, 2> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_mse_forward);
  return op.call(source_pred, source_target, target_pred, target_target, alpha, reduction, write_grad);
}

// Gradients with respect to each side's prediction; the target's is their negation.
inline SideGrads _alpha_weighted_mse_backward(const std::optional<at::Tensor>& source_grad_output,
                                              const std::optional<at::Tensor>& target_grad_output,
                                              const at::Tensor& source_pred, const at::Tensor& source_target,
                                              const at::Tensor& target_pred, const at::Tensor& target_target,
                                              const at::Tensor& alpha, at::TensorList saved, int64_t reduction,
                                              std::array<bool, 2> output_mask) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_mse_backward);
  return op.call(source_grad_output, target_grad_output, source_pred, source_target, target_pred, target_target,
                 alpha, saved, reduction, output_mask);
}

}  // namespace fastadapt::ops
