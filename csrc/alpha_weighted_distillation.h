// fastadapt::alpha_weighted_distillation and its internal forward/backward ops, called through the
// dispatcher: the one place their C++ signatures are written. The schemas are in
// alpha_weighted_distillation.cpp; the device kernels (cpu/, cuda/) and the autograd kernel (autograd/)
// are registered with exactly these types (FASTADAPT_IMPL checks it at compile time).
//
// The loss (Learning without Forgetting) of student logits z (..., C), labels y (...) and frozen
// teacher logits t (..., K), K <= C:
//   alpha * CE(z, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(z[..., :K] / T))
// The two terms are returned apart, `(distill_term, ce_term)`, already weighted, in the accumulation
// type (two_sided.h): the distillation is the "source" side of the two-sided conventions (weight
// 1 - alpha), the cross-entropy the "target" side (weight alpha). Reduction mean averages the CE over
// non-ignored rows and the KL over all (flattened) rows; every row is distilled, whatever
// its label.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "register.h"
#include "two_sided.h"

namespace fastadapt::ops {

inline std::tuple<at::Tensor, at::Tensor> alpha_weighted_distillation(const at::Tensor& logits,
                                                                      const at::Tensor& labels,
                                                                      const at::Tensor& teacher_logits,
                                                                      const at::Tensor& alpha, double temperature,
                                                                      int64_t ignore_index, double label_smoothing,
                                                                      int64_t reduction) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_distillation);
  return op.call(logits, labels, teacher_logits, alpha, temperature, ignore_index, label_smoothing, reduction);
}

// Returns (distill_term, ce_term, saved, grad). saved = {stats, count}: stats (rows, 3) float64 holds
// per row the log-sum-exp of z, of z[:K] / T and of t / T (0 where that term is not evaluated);
// count (1,) int64 the number of non-ignored rows. grad is the gradient with respect to the logits
// for a unit grad_output of both terms when write_grad asks for it, else a tensor of 0 elements.
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> _alpha_weighted_distillation_forward(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& teacher_logits, const at::Tensor& alpha,
    double temperature, int64_t ignore_index, double label_smoothing, int64_t reduction, bool write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_distillation_forward);
  return op.call(logits, labels, teacher_logits, alpha, temperature, ignore_index, label_smoothing, reduction,
                 write_grad);
}

// The gradient with respect to the logits: each term's gradient times its own grad_output (an absent
// one contributes nothing).
inline at::Tensor _alpha_weighted_distillation_backward(const std::optional<at::Tensor>& distill_grad_output,
                                                        const std::optional<at::Tensor>& ce_grad_output,
                                                        const at::Tensor& logits, const at::Tensor& labels,
                                                        const at::Tensor& teacher_logits, const at::Tensor& alpha,
                                                        at::TensorList saved, double temperature,
                                                        int64_t ignore_index, double label_smoothing,
                                                        int64_t reduction) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_distillation_backward);
  return op.call(distill_grad_output, ce_grad_output, logits, labels, teacher_logits, alpha, saved, temperature,
                 ignore_index, label_smoothing, reduction);
}

}  // namespace fastadapt::ops

namespace fastadapt {

// One distillation call as the kernels read it: the student as a cross-entropy side (two_sided.h) and
// the teacher as (rows, K) with unit class stride, under the same rules.
struct DistillCall {
  CeSide student;
  at::Tensor teacher;
  int64_t teacher_classes = 0, teacher_row_stride = 0;
};

inline DistillCall make_distill_call(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& teacher,
                                     double temperature, int64_t reduction) {
  check_reduction(reduction);
  TORCH_CHECK(logits.scalar_type() == teacher.scalar_type(), "logits and teacher_logits must share a dtype");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "temperature must be finite and > 0, got ",
              temperature);
  DistillCall d;
  d.student = make_ce_side(logits, labels, std::nullopt);
  TORCH_CHECK(!d.student.soft, "labels must be class indices (the distillation kernels read no probability targets)");
  const int64_t K = teacher.dim() >= 1 ? teacher.size(-1) : 0;
  TORCH_CHECK(teacher.dim() == logits.dim() && teacher.sizes().slice(0, teacher.dim() - 1) ==
                                                   logits.sizes().slice(0, logits.dim() - 1) &&
                  K >= (d.student.rows > 0 ? 1 : 0) && K <= d.student.classes,
              "teacher_logits must be (..., K) with the logits' leading dimensions and 1 <= K <= C");
  d.teacher_classes = K;
  at::Tensor t2 = teacher.reshape({d.student.rows, K});
  if (d.student.rows > 0 && (t2.stride(1) != 1 || (d.student.rows > 1 && t2.stride(0) < K))) t2 = t2.contiguous();
  d.teacher = t2;
  d.teacher_row_stride = d.student.rows > 1 ? t2.stride(0) : K;
  return d;
}

}  // namespace fastadapt
