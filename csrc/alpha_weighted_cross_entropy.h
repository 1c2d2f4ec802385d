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

// Logits (..., C) per side with either class indices (...) of an integer dtype or probability targets
// of the logits' shape and dtype (the kernels dispatch on the labels' dtype, as F.cross_entropy does on
// the target's); source_weight / target_weight are optional per-class weights (C,) in the logits' dtype,
// F.cross_entropy's `weight`. Returns (source_term, target_term), already weighted, in the
// accumulation type (two_sided.h). The class weights come by value: they are options the autograd node
// keeps (autograd/two_sided_loss.h), and are never differentiated.
inline std::tuple<at::Tensor, at::Tensor> alpha_weighted_cross_entropy(const at::Tensor& source_logits,
                                                                       const at::Tensor& source_labels,
                                                                       const at::Tensor& target_logits,
                                                                       const at::Tensor& target_labels,
                                                                       const at::Tensor& alpha, int64_t ignore_index,
                                                                       double label_smoothing, int64_t reduction,
                                                                       std::optional<at::Tensor> source_weight,
                                                                       std::optional<at::Tensor> target_weight) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_cross_entropy);
  return op.call(source_logits, source_labels, target_logits, target_labels, alpha, ignore_index, label_smoothing,
                 reduction, std::move(source_weight), std::move(target_weight));
}

// saved = {source_lse, target_lse, denominators}: per-row log-sum-exp (float64; 0 at ignored rows) and
// each side's divisor for reduction mean (float64, 2): F.cross_entropy's, i.e. the number of
// non-ignored rows, the sum of weight[label] over them with class weights, or the number of rows with
// probability targets.
inline LossForward _alpha_weighted_cross_entropy_forward(const at::Tensor& source_logits,
                                                         const at::Tensor& source_labels,
                                                         const at::Tensor& target_logits,
                                                         const at::Tensor& target_labels, const at::Tensor& alpha,
                                                         int64_t ignore_index, double label_smoothing,
                                                         int64_t reduction, std::optional<at::Tensor> source_weight,
                                                         std::optional<at::Tensor> target_weight,
                                                         std::array<bool, 2> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_cross_entropy_forward);
  return op.call(source_logits, source_labels, target_logits, target_labels, alpha, ignore_index, label_smoothing,
                 reduction, std::move(source_weight), std::move(target_weight), write_grad);
}

// The gradients of the logits only; a probability target's gradient is formed by the autograd node
// from the saved log-sum-exp (autograd/alpha_weighted_cross_entropy.cpp).
inline SideGrads _alpha_weighted_cross_entropy_backward(const std::optional<at::Tensor>& source_grad_output,
                                                        const std::optional<at::Tensor>& target_grad_output,
                                                        const at::Tensor& source_logits,
                                                        const at::Tensor& source_labels,
                                                        const at::Tensor& target_logits,
                                                        const at::Tensor& target_labels, const at::Tensor& alpha,
                                                        at::TensorList saved, int64_t ignore_index,
                                                        double label_smoothing, int64_t reduction,
                                                        std::optional<at::Tensor> source_weight,
                                                        std::optional<at::Tensor> target_weight,
                                                        std::array<bool, 2> output_mask) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_cross_entropy_backward);
  return op.call(source_grad_output, target_grad_output, source_logits, source_labels, target_logits, target_labels,
                 alpha, saved, ignore_index, label_smoothing, reduction, std::move(source_weight),
                 std::move(target_weight), output_mask);
}

}  // namespace fastadapt::ops
