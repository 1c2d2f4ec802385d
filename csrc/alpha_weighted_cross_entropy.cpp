// Schemas of the alpha-weighted cross-entropy ops; their C++ entry points are in the header.
// Conventions (two_sided.h): reduction 0 = none, 1 = mean, 2 = sum; alpha a 0-dim floating tensor on
// the CPU or on the logits' device, so that a schedule can change it without a recompile under
// torch.compile. A side's labels are class indices (any integer dtype) or probability targets (the
// logits' shape and dtype); source_weight / target_weight are F.cross_entropy's per-class `weight`.
#include "alpha_weighted_cross_entropy.h"

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.def(
      "alpha_weighted_cross_entropy(Tensor source_logits, Tensor source_labels, Tensor target_logits, "
      "Tensor target_labels, Tensor alpha, int ignore_index=-100, float label_smoothing=0.0, "
      "int reduction=1, Tensor? source_weight=None, Tensor? target_weight=None) "
      "-> (Tensor source_term, Tensor target_term)");
  // (the terms are float32 for bf16/fp16 logits: see two_sided.h)
  // Used by the autograd node. write_grad[i] asks for side i's gradient for a unit grad_output to be
  // written during the forward where the kernel's strategy does that (the CPU, reduction mean/sum);
  // otherwise that gradient comes back with 0 elements and the backward op computes it.
  m.def(
      "_alpha_weighted_cross_entropy_forward(Tensor source_logits, Tensor source_labels, "
      "Tensor target_logits, Tensor target_labels, Tensor alpha, int ignore_index, float label_smoothing, "
      "int reduction, Tensor? source_weight, Tensor? target_weight, bool[2] write_grad) "
      "-> (Tensor source_term, Tensor target_term, Tensor[] saved, "
      "Tensor source_grad, Tensor target_grad)");
  m.def(
      "_alpha_weighted_cross_entropy_backward(Tensor? source_grad_output, Tensor? target_grad_output, "
      "Tensor source_logits, Tensor source_labels, Tensor target_logits, Tensor target_labels, Tensor alpha, "
      "Tensor[] saved, int ignore_index, float label_smoothing, int reduction, Tensor? source_weight, "
      "Tensor? target_weight, bool[2] output_mask) "
      "-> (Tensor source_grad, Tensor target_grad)");
}
