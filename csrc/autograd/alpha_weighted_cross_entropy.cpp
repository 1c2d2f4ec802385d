// Autograd of the alpha-weighted cross-entropy: the two-sided loss node (two_sided_loss.h). On the CPU
// with reduction mean/sum the forward kernel writes the gradient while each logits row is in cache
// (csrc/cpu/alpha_weighted_cross_entropy.cpp says why); elsewhere the backward kernel recomputes it.
// Probability targets are differentiable as in F.cross_entropy; class weights are not (the Python
// layer refuses a weight that requires grad).
#include <ATen/TensorOperators.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <limits>

#include "alpha_weighted_cross_entropy.h"
#include "autograd/two_sided_loss.h"
#include "register.h"

namespace fastadapt {

// The node autograd records (named after it).
struct AlphaWeightedCrossEntropy : TwoSidedLossNode<AlphaWeightedCrossEntropy> {
  // ignore_index, label_smoothing, reduction, source_weight, target_weight
  using Options = std::tuple<int64_t, double, int64_t, std::optional<at::Tensor>, std::optional<at::Tensor>>;
  static constexpr bool kSecondGradIsNegatedFirst = false;  // labels: none; probabilities: second_grad
  static constexpr auto& forward_op = ops::_alpha_weighted_cross_entropy_forward;
  static constexpr auto& backward_op = ops::_alpha_weighted_cross_entropy_backward;
  static bool writes_grad_in_forward(const at::Tensor& logits, const Options& o) {
    return logits.is_cpu() && std::get<2>(o) != kNone;
  }

  // d loss / d targets of side k (probability targets (..., C)): F.cross_entropy's
  //   -(1 - eps) * weight[c] * log_softmax(logits)[..., c]
  // times the side's weight and its grad_output (per row for reduction none, over the mean's divisor
  // for mean). Formed from the saved log-sum-exp with ATen ops, in float64, on any device and under
  // torch.compile: a target that requires grad is the rare case, not worth a kernel.
  static at::Tensor second_grad(int k, const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& grad_output, const at::Tensor& alpha,
                                const std::vector<at::Tensor>& saved, const Options& o) {
    const auto f64 = logits.options().dtype(at::kDouble);
    const double eps = std::get<1>(o);
    const int64_t reduction = std::get<2>(o);
    const std::optional<at::Tensor>& class_weight = k == 0 ? std::get<3>(o) : std::get<4>(o);
    // the side's weight as weight_of() (two_sided.h) forms it, without a host sync on a device alpha
    const at::Tensor a = alpha.to(f64).reshape({});
    const at::Tensor side_w = at::where((a >= 0.0).logical_and(a <= 1.0), k == 0 ? 1.0 - a : a,
                                        std::numeric_limits<double>::quiet_NaN());
    std::vector<int64_t> row_shape = logits.sizes().vec();
    row_shape.back() = 1;
    at::Tensor g = (logits.to(f64) - saved[k].to(f64).reshape(row_shape)) * -(1.0 - eps);
    if (class_weight.has_value() && class_weight->defined()) g = g * class_weight->to(f64);
    at::Tensor scale = grad_output.to(f64) * side_w;
    if (reduction == kNone) scale = scale.unsqueeze(-1);
    if (reduction == kMean) scale = scale / saved[2].to(f64)[k];
    // a zero-weight side is not evaluated: its targets get zeros even where its logits are NaN
    g = at::where(side_w == 0.0, at::zeros_like(g), g * scale);
    return g.to(targets.scalar_type());
  }
};

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_cross_entropy, TwoSidedLossKernel<AlphaWeightedCrossEntropy>::call);
  // Internal ops: callable, not differentiable (double backward is not supported).
  m.impl("_alpha_weighted_cross_entropy_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
