// Autograd of the alpha-weighted distillation. One differentiable input (the student's logits)
// receives the gradients of both terms, each times its own grad_output; the teacher is frozen (the
// Python layer rejects a teacher that requires grad) and labels and alpha get none.
//
// On the CPU with reduction mean/sum the forward kernel writes the gradient for a unit grad_output of
// both terms while each row is in cache (csrc/cpu/alpha_weighted_distillation.cpp says why). That one
// buffer serves backward only when both terms got the same scalar grad_output, as from the Python
// layer's distill_term + ce_term; anything else, and every traced (torch.compile) call, runs the
// backward op, which reads the inputs again.
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "alpha_weighted_distillation.h"
#include "autograd/util.h"
#include "register.h"

namespace fastadapt {
namespace {

using at::Tensor;

// Whether two grad_outputs are known, without a device sync, to hold one and the same scalar.
bool same_scalar(const Tensor& a, const Tensor& b) {
  if (a.is_same(b)) return true;
  if (is_traced(a) || is_traced(b) || !a.is_cpu() || !b.is_cpu() || a.numel() != 1 || b.numel() != 1) return false;
  return a.item<double>() == b.item<double>();
}

// The node autograd records (named after it).
struct AlphaWeightedDistillation : torch::autograd::Function<AlphaWeightedDistillation> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                                const Tensor& labels, const Tensor& teacher, const Tensor& alpha,
                                                double temperature, int64_t ignore_index, double label_smoothing,
                                                int64_t reduction) {
    // traced, backward cannot compare the two grad_outputs (same_scalar): it recomputes, so nothing is
    // written here
    const bool write = logits.is_cpu() && reduction != kNone && logits.requires_grad() && !is_traced(logits);
    auto [term_kd, term_ce, saved, grad] = ops::_alpha_weighted_distillation_forward(
        logits, labels, teacher, alpha, temperature, ignore_index, label_smoothing, reduction, write);
    // The written gradient is a SavedVariable, not saved_data: autograd releases it before the next node
    // runs (unless retain_graph), so AccumulateGrad adopts it without a copy.
    ctx->save_for_backward({logits, labels, teacher, grad});
    ctx->saved_data["written"] = write;
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["alpha"] = alpha.detach().clone();  // a schedule may change alpha in place before backward
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    return {term_kd, term_ce};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(8);
    if (!ctx->needs_input_grad(0) || (!grads[0].defined() && !grads[1].defined())) return out;
    auto& sd = ctx->saved_data;
    const auto v = ctx->get_saved_variables();
    // create_graph=True needs a differentiable backward: the op path raises a clear error there.
    if (sd["written"].toBool() && !at::GradMode::is_enabled() && grads[0].defined() && grads[1].defined() &&
        same_scalar(grads[0], grads[1]) && saved_grad_serves(v[3], grads[0])) {
      out[0] = scale_saved_grad(v[3], grads[0]);
      return out;
    }
    auto opt = [](const Tensor& g) { return g.defined() ? std::optional<Tensor>(g) : std::nullopt; };
    out[0] = ops::_alpha_weighted_distillation_backward(
        opt(grads[0]), opt(grads[1]), v[0], v[1], v[2], sd["alpha"].toTensor(), sd["saved"].toTensorVector(),
        sd["temperature"].toDouble(), sd["ignore_index"].toInt(), sd["label_smoothing"].toDouble(),
        sd["reduction"].toInt());
    return out;
  }
};

std::tuple<Tensor, Tensor> autograd_kernel(const Tensor& logits, const Tensor& labels, const Tensor& teacher,
                                           const Tensor& alpha, double temperature, int64_t ignore_index,
                                           double label_smoothing, int64_t reduction) {
  // a direct op call with a teacher that requires grad would silently get none
  TORCH_CHECK(!teacher.requires_grad(), "teacher_logits must not require grad: the teacher gets no gradient");
  auto out = AlphaWeightedDistillation::apply(logits, labels, teacher, alpha, temperature, ignore_index,
                                              label_smoothing, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_distillation, autograd_kernel);
  // Internal ops: callable, not differentiable (double backward is not supported).
  m.impl("_alpha_weighted_distillation_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_distillation_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
