// Schemas of the alpha-weighted MSE ops; their C++ entry points are in the header. Conventions:
// two_sided.h and alpha_weighted_cross_entropy.cpp.
#include "alpha_weighted_mse.h"

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
