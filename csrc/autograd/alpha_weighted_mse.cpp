// Autograd of the alpha-weighted MSE: the two-sided loss node (two_sided_loss.h). On the CPU with
// reduction mean/sum the forward kernel writes d/d pred in its one pass; the target gets the negation.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "alpha_weighted_mse.h"
#include "autograd/two_sided_loss.h"
#include "register.h"

namespace fastadapt {

// The node autograd records (named after it).
struct AlphaWeightedMse : TwoSidedLossNode<AlphaWeightedMse> {
  using Options = std::tuple<int64_t>;  // reduction
  static constexpr bool kSecondGradIsNegatedFirst = true;  // d/d target = -d/d pred
  static constexpr auto& forward_op = ops::_alpha_weighted_mse_forward;
  static constexpr auto& backward_op = ops::_alpha_weighted_mse_backward;
  static bool writes_grad_in_forward(const at::Tensor& pred, const Options& o) {
    return pred.is_cpu() && std::get<0>(o) != kNone;
  }
};

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_mse, TwoSidedLossKernel<AlphaWeightedMse>::call);
  m.impl("_alpha_weighted_mse_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_mse_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
