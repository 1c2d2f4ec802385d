// fastadapt::alpha_weighted_cross_entropy and its internal forward/backward ops, called through the dispatcher: the one place their C++ signatures are
// written. The schemas are in alpha_weighted_cross_entropy.cpp; the device kernels (cpu/, cuda/) and the autograd kernel
// (autograd/) are registered with exactly these types (FASTADAPT_IMPL checks it at compile time).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "register.h"
#include "two_sided.h"

namespace fastadapt::ops {

// Logits (..., C) with labels (...) per side; returns (source_term, target_term), already weighted, in
// the accumulation type (two_sided.h).
inline std::tuple<at::Tensor, at::Tensor> alpha_weighted_cross_entropy(const at::Tensor& source_logits,
                                                                       const at::Tensor& source_labels,
                                                                       const at::Tensor& target_logits,
                                                                       const at::Tensor& target_labels,
                                                                       const at::Tensor& alpha, int64_t ignore_index,
                                                                       double label_smoothing, int64_t reduction) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_cross_entropy);
  return op.call(source_logits, source_labels, target_logits, target_labels, alpha, ignore_index, label_smoothing,
                 reduction);
}

// saved = {source_lse, target_lse, counts}: per-row log-sum-exp (float64) and the number of
// non-ignored rows of each side (int64, 2).
inline LossForward _alpha_weighted_cross_entropy_forward(const at::Tensor& source_logits,
                                                         const at::Tensor& source_labels,
                                                         const at::Tensor& target_logits,
                                                         const at::Tensor& target_labels, const at::Tensor& alpha,
                                                         int64_t ignore_index, double label_smoothing,
                                                         int64_t reduction, std::array<bool, 2> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_cross_entropy_forward);
  return op.call(source_logits, source_labels, target_logits, target_labels, alpha, ignore_index, label_smoothing,
                 reduction, write_grad);
}

inline SideGrads _alpha_weighted_cross_entropy_backward(const std::optional<at::Tensor>& source_grad_output,
                                                        const std::optional<at::Tensor>& target_grad_output,
                                                        const at::Tensor& source_logits,
                                                        const at::Tensor& source_labels,
                                                        const at::Tensor& target_logits,
                                                        const at::Tensor& target_labels, const at::Tensor& alpha,
                                                        at::TensorList saved, int64_t ignore_index,
                                                        double label_smoothing, int64_t reduction,
                                                        std::array<bool, 2> output_mask) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_cross_entropy_backward);
  return op.call(source_grad_output, target_grad_output, source_logits, source_labels, target_logits, target_labels,
                 alpha, saved, ignore_index, label_smoothing, reduction, output_mask);
}

}  // namespace fastadapt::ops
