// Autograd of the alpha-weighted cross-entropy: the two-sided loss node (two_sided_loss.h). On the CPU
// with reduction mean/sum the forward kernel writes the gradient while each logits row is in cache
// (csrc/cpu/alpha_weighted_cross_entropy.cpp says why); elsewhere the backward kernel recomputes it.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "alpha_weighted_cross_entropy.h"
#include "autograd/two_sided_loss.h"
#include "register.h"

namespace fastadapt {

// The node autograd records (named after it).
struct AlphaWeightedCrossEntropy : TwoSidedLossNode<AlphaWeightedCrossEntropy> {
  using Options = std::tuple<int64_t, double, int64_t>;  // ignore_index, label_smoothing, reduction
  static constexpr bool kSecondInputGrad = false;         // labels
  static constexpr auto& forward_op = ops::_alpha_weighted_cross_entropy_forward;
  static constexpr auto& backward_op = ops::_alpha_weighted_cross_entropy_backward;
  static bool writes_grad_in_forward(const at::Tensor& logits, const Options& o) {
    return logits.is_cpu() && std::get<2>(o) != kNone;
  }
};

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_cross_entropy, TwoSidedLossKernel<AlphaWeightedCrossEntropy>::call);
  // Internal ops: callable, not differentiable (double backward is not supported).
  m.impl("_alpha_weighted_cross_entropy_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
