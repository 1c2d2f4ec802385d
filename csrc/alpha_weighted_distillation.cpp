// Schemas of the alpha-weighted distillation ops; their C++ entry points and the loss they compute are
// in the header. Conventions as the two-sided losses (two_sided.h): reduction 0 = none, 1 = mean,
// 2 = sum; alpha a 0-dim floating tensor on the CPU or on the logits' device.
#include "alpha_weighted_distillation.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def(
      "alpha_weighted_distillation(Tensor logits, Tensor labels, Tensor teacher_logits, Tensor alpha, "
      "float temperature=1.0, int ignore_index=-100, float label_smoothing=0.0, int reduction=1) "
      "-> (Tensor distill_term, Tensor ce_term)");
  // Used by the autograd node. write_grad asks for the logits' gradient for a unit grad_output of both
  // terms to be written during the forward (the node asks on the CPU with reduction mean/sum).
  m.def(
      "_alpha_weighted_distillation_forward(Tensor logits, Tensor labels, Tensor teacher_logits, Tensor alpha, "
      "float temperature, int ignore_index, float label_smoothing, int reduction, bool write_grad) "
      "-> (Tensor distill_term, Tensor ce_term, Tensor[] saved, Tensor grad)");
  m.def(
      "_alpha_weighted_distillation_backward(Tensor? distill_grad_output, Tensor? ce_grad_output, Tensor logits, "
      "Tensor labels, Tensor teacher_logits, Tensor alpha, Tensor[] saved, float temperature, int ignore_index, "
      "float label_smoothing, int reduction) -> Tensor");
}
