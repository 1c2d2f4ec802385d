// Schemas of the alpha-weighted MSE ops (conventions: two_sided.h and alpha_weighted_cross_entropy.cpp)
// and their C++ entry points.
#include "alpha_weighted_mse.h"

#include "register.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def(
      "alpha_weighted_mse(Tensor source_pred, Tensor source_target, Tensor target_pred, Tensor target_target, "
      "Tensor alpha, int reduction=1) -> (Tensor source_term, Tensor target_term)");
  m.def(
      "_alpha_weighted_mse_forward(Tensor source_pred, Tensor source_target, Tensor target_pred, "
      "Tensor target_target, Tensor alpha, int reduction, bool[2] write_grad) -> (Tensor source_term, "
      "Tensor target_term, Tensor[] saved, Tensor source_grad, Tensor target_grad)");
  // d/d pred for each side; d/d target is its negation.
  m.def(
      "_alpha_weighted_mse_backward(Tensor? source_grad_output, Tensor? target_grad_output, Tensor source_pred, "
      "Tensor source_target, Tensor target_pred, Tensor target_target, Tensor alpha, Tensor[] saved, "
      "int reduction, bool[2] output_mask) -> (Tensor source_grad, Tensor target_grad)");
}

namespace fastadapt::ops {

std::tuple<at::Tensor, at::Tensor> alpha_weighted_mse(const at::Tensor& source_pred, const at::Tensor& source_target,
                                                      const at::Tensor& target_pred, const at::Tensor& target_target,
                                                      const at::Tensor& alpha, int64_t reduction) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_mse);
  return op.call(source_pred, source_target, target_pred, target_target, alpha, reduction);
}

LossForward _alpha_weighted_mse_forward(const at::Tensor& source_pred, const at::Tensor& source_target,
                                        const at::Tensor& target_pred, const at::Tensor& target_target,
                                        const at::Tensor& alpha, int64_t reduction, std::array<bool, 2> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_mse_forward);
  return op.call(source_pred, source_target, target_pred, target_target, alpha, reduction, write_grad);
}

SideGrads _alpha_weighted_mse_backward(const std::optional<at::Tensor>& source_grad_output,
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
