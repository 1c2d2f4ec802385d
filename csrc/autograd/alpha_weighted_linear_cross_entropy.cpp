// Autograd of the fused linear + alpha-weighted cross-entropy.
//   reduction mean/sum: the forward op writes every wanted gradient for a unit grad_output
//     (chunked_linear_ce.h says why); backward only scales them by the loss's grad_output and rounds them
//     to the inputs' dtype (a bf16 hidden gradient scaled by a grad_output other than 1 is thus rounded
//     twice: BENCHMARKS.md's issue-13 section lists it).
//   reduction none: one grad_output per row, so backward runs the backward op, a second chunked pass.
// A frozen head (weight without grad) asks for no weight gradient: its GEMM is skipped. Double backward
// is not supported.
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <tuple>

#include "alpha_weighted_linear_cross_entropy.h"
#include "autograd/util.h"
#include "register.h"

namespace fastadapt {

struct AlphaWeightedLinearCrossEntropy : torch::autograd::Function<AlphaWeightedLinearCrossEntropy> {
  // ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_size
  using Options = std::tuple<int64_t, double, int64_t, double, std::optional<double>, int64_t>;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& sh,
                                                const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                                                const at::Tensor& w, const std::optional<at::Tensor>& b,
                                                const at::Tensor& alpha, const Options& options) {
    const auto [ignore, eps, reduction, z, cap, chunk] = options;
    const bool has_b = b.has_value() && b->defined();
    const std::array<bool, 4> want = {sh.requires_grad(), th.requires_grad(), w.requires_grad(),
                                      has_b && b->requires_grad()};
    ctx->saved_data["dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["ignore"] = ignore;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["z"] = z;
    ctx->saved_data["cap"] = cap.has_value() ? c10::IValue(*cap) : c10::IValue();
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["want"] = std::vector<bool>(want.begin(), want.end());
    if (reduction == kNone) {
      auto [s, t, gs, gt, gw, gb] = ops::_alpha_weighted_linear_cross_entropy_forward(
          sh, sy, th, ty, w, b, alpha, ignore, eps, reduction, z, cap, chunk, {});
      ctx->save_for_backward({sh, sy, th, ty, w, has_b ? *b : at::Tensor(), alpha});
      ctx->saved_data["none"] = true;
      return {s, t};
    }
    auto [loss, unused, gs, gt, gw, gb] = ops::_alpha_weighted_linear_cross_entropy_forward(
        sh, sy, th, ty, w, b, alpha, ignore, eps, reduction, z, cap, chunk, want);
    ctx->mark_non_differentiable({unused});
    // SavedVariables, released before the next node runs (unless retain_graph)
    ctx->save_for_backward({gs, gt, gw, gb});
    ctx->saved_data["none"] = false;
    return {loss, unused};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    // (grads of: source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, options)
    torch::autograd::variable_list out(8);
    if (ctx->saved_data["none"].toBool()) {
      if (!grads[0].defined() && !grads[1].defined()) return out;
      auto& d = ctx->saved_data;
      const std::optional<double> cap = d["cap"].isNone() ? std::nullopt : std::optional<double>(d["cap"].toDouble());
      const auto wl = ctx->saved_data["want"].toBoolList();
      std::array<bool, 4> want{};
      for (int i = 0; i < 4; ++i) want[i] = wl[i] && ctx->needs_input_grad(i < 2 ? 2 * i : i + 2);
      auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
      auto [gs, gt, gw, gb] = ops::_alpha_weighted_linear_cross_entropy_backward(
          opt(grads[0]), opt(grads[1]), v[0], v[1], v[2], v[3], v[4], opt(v[5]), v[6], d["ignore"].toInt(),
          d["eps"].toDouble(), d["z"].toDouble(), cap, d["chunk"].toInt(), want);
      // want[i] set: the op wrote that gradient (reads no sizes: they are symbolic under torch.compile)
      out[0] = want[0] ? gs.to(dtype) : at::Tensor();
      out[2] = want[1] ? gt.to(dtype) : at::Tensor();
      out[4] = want[2] ? gw.to(dtype) : at::Tensor();
      out[5] = want[3] ? gb.to(dtype) : at::Tensor();
      return out;
    }
    const at::Tensor& go = grads[0];
    if (!go.defined()) return out;
    auto scaled = [&](int input, const at::Tensor& g) {
      return ctx->needs_input_grad(input) ? scale_saved_grad(g, go).to(dtype) : at::Tensor();
    };
    out[0] = scaled(0, v[0]);
    out[2] = scaled(2, v[1]);
    out[4] = scaled(4, v[2]);
    out[5] = scaled(5, v[3]);
    return out;
  }
};

ops::LinearCeOut autograd_kernel(const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th,
                                 const at::Tensor& ty, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                 const at::Tensor& alpha, int64_t ignore_index, double label_smoothing,
                                 int64_t reduction, double z_loss, std::optional<double> softcap,
                                 int64_t chunk_size) {
  const auto out = AlphaWeightedLinearCrossEntropy::apply(
      sh, sy, th, ty, w, b, alpha,
      AlphaWeightedLinearCrossEntropy::Options(ignore_index, label_smoothing, reduction, z_loss, softcap,
                                               chunk_size));
  return {out[0], out[1]};
}

TORCH_LIBRARY_IMPL(fastadapt, Autograd, m) {
  FASTADAPT_IMPL(m, alpha_weighted_linear_cross_entropy, autograd_kernel);
  // Internal ops: callable, not differentiable.
  m.impl("_alpha_weighted_linear_cross_entropy_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("_alpha_weighted_linear_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastadapt
