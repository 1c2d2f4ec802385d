// Schemas of the fused linear + alpha-weighted cross-entropy ops; their C++ entry points and conventions
// are in the header. alpha is a 0-dim floating tensor, as for the other two-sided losses (two_sided.h).
#include "alpha_weighted_linear_cross_entropy.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def(
      "alpha_weighted_linear_cross_entropy(Tensor source_hidden, Tensor source_labels, Tensor target_hidden, "
      "Tensor target_labels, Tensor weight, Tensor? bias, Tensor alpha, int ignore_index=-100, "
      "float label_smoothing=0.0, int reduction=1, float z_loss=0.0, float? softcap=None, int chunk_size=64) "
      "-> (Tensor, Tensor)");
  // Used by the autograd node: write_grad = (source_hidden, target_hidden, weight, bias).
  m.def(
      "_alpha_weighted_linear_cross_entropy_forward(Tensor source_hidden, Tensor source_labels, "
      "Tensor target_hidden, Tensor target_labels, Tensor weight, Tensor? bias, Tensor alpha, int ignore_index, "
      "float label_smoothing, int reduction, float z_loss, float? softcap, int chunk_size, bool[4] write_grad) "
      "-> (Tensor, Tensor, Tensor source_hidden_grad, Tensor target_hidden_grad, Tensor weight_grad, "
      "Tensor bias_grad)");
  m.def(
      "_alpha_weighted_linear_cross_entropy_backward(Tensor? grad_source, Tensor? grad_target, "
      "Tensor source_hidden, Tensor source_labels, Tensor target_hidden, Tensor target_labels, Tensor weight, "
      "Tensor? bias, Tensor alpha, int ignore_index, float label_smoothing, float z_loss, float? softcap, "
      "int chunk_size, bool[4] write_grad) "
      "-> (Tensor source_hidden_grad, Tensor target_hidden_grad, Tensor weight_grad, Tensor bias_grad)");
}
