// The autograd node of every two-sided loss (csrc/two_sided.h), one template for all of them.
//
// Forward runs the loss's internal forward op. Where the loss writes gradients during the forward
// (Loss::writes_grad_in_forward: the CPU kernels with reduction mean/sum, one read of the input in
// all), it asks for them for each side whose input requires grad; backward then only scales the saved
// gradient by that side's grad_output, without a copy for the usual unit grad_output (and not at all
// where that would round a low-precision gradient twice: saved_grad_serves). Elsewhere backward runs
// the internal backward op, which reads the inputs again. Each side's gradient follows
// its own term's grad_output, so a caller may weight or drop either term; a side whose term did not
// reach the loss gets no gradient at all.
//
// A loss derives from TwoSidedLossNode<itself> (so autograd names the node after the loss) and provides:
//   Options                 std::tuple of the op's arguments between alpha and the flags (never
//                           differentiated; optional tensors among them are kept as they are)
//   forward_op, backward_op the internal ops (csrc/<op>.h)
//   kSecondGradIsNegatedFirst  whether a side's second input gets the negated gradient of the first
//                           (MSE's target); if not, a second input that requires grad gets
//                           second_grad(side, first, second, grad_output, alpha, saved, options)
//                           (cross-entropy's probability targets)
//   writes_grad_in_forward(input, options)
#pragma once
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>

#include <array>
#include <tuple>
#include <utility>

#include "autograd/util.h"

namespace fastadapt {

// Options travel through saved_data as a list of IValues, not as a tuple IValue: reading a tuple of more
// than 3 elements back (IValue::to<std::tuple>) indexes ivalue::TupleElements' 3-element inline array
// on a branch GCC 12 cannot rule out, and -Warray-bounds reports it inside torch's ivalue_inl.h.
template <typename Options>
c10::IValue options_to_ivalue(const Options& options) {
  c10::impl::GenericList list(c10::AnyType::get());
  list.reserve(std::tuple_size_v<Options>);
  std::apply([&](const auto&... opt) { (list.push_back(c10::IValue(opt)), ...); }, options);
  return list;
}

template <typename Options, size_t... I>
Options options_from_ivalue(const c10::IValue& value, std::index_sequence<I...> /*unused*/) {
  const c10::impl::GenericList list = value.toList();
  return Options(list.get(I).template to<std::tuple_element_t<I, Options>>()...);
}

template <typename Options>
Options options_from_ivalue(const c10::IValue& value) {
  return options_from_ivalue<Options>(value, std::make_index_sequence<std::tuple_size_v<Options>>{});
}

template <typename Loss>
class TwoSidedLossNode : public torch::autograd::Function<Loss> {
  using Tensor = at::Tensor;

 public:
  // Options is Loss::Options (a template parameter here because Loss is incomplete at this point).
  template <typename Options>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& s_in,
                                                const Tensor& s_second, const Tensor& t_in, const Tensor& t_second,
                                                const Tensor& alpha, const Options& options) {
    const bool write = Loss::writes_grad_in_forward(s_in, options);
    const std::array<bool, 2> want = {write && wants_grad(s_in, s_second), write && wants_grad(t_in, t_second)};
    auto [term_s, term_t, saved, grad_s, grad_t] = std::apply(
        [&](auto... opt) { return Loss::forward_op(s_in, s_second, t_in, t_second, alpha, opt..., want); }, options);
    // The written gradients are SavedVariables, not saved_data: autograd releases those before the
    // next node runs (unless retain_graph), so AccumulateGrad adopts them without a copy.
    ctx->save_for_backward({s_in, s_second, t_in, t_second, grad_s, grad_t});
    ctx->saved_data["written_s"] = want[0];
    ctx->saved_data["written_t"] = want[1];
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["alpha"] = alpha.detach().clone();  // a schedule may change alpha in place before backward
    ctx->saved_data["options"] = options_to_ivalue(options);
    return {term_s, term_t};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using Options = typename Loss::Options;
    auto& sd = ctx->saved_data;
    const auto v = ctx->get_saved_variables();
    const bool written[2] = {sd["written_s"].toBool(), sd["written_t"].toBool()};
    std::array<Tensor, 2> g;
    std::array<bool, 2> rest = {false, false};
    for (int k = 0; k < 2; ++k) {
      const bool needed =
          ctx->needs_input_grad(2 * k) || (Loss::kSecondGradIsNegatedFirst && ctx->needs_input_grad(2 * k + 1));
      if (!needed || !grads[k].defined()) continue;  // no gradient: autograd reads it as zeros
      // create_graph=True needs a differentiable backward: the op path raises a clear error there.
      if (written[k] && !at::GradMode::is_enabled() && saved_grad_serves(v[4 + k], grads[k])) {
        g[k] = scale_saved_grad(v[4 + k], grads[k]);
      } else {
        rest[k] = true;
      }
    }
    if (rest[0] || rest[1]) {
      const std::vector<Tensor> saved = sd["saved"].toTensorVector();
      auto [gs, gt] = std::apply(
          [&](auto... opt) {
            return Loss::backward_op(rest[0] ? std::optional<Tensor>(grads[0]) : std::nullopt,
                                  rest[1] ? std::optional<Tensor>(grads[1]) : std::nullopt, v[0], v[1], v[2], v[3],
                                  sd["alpha"].toTensor(), saved, opt..., rest);
          },
          options_from_ivalue<Options>(sd["options"]));
      if (rest[0]) g[0] = gs;
      if (rest[1]) g[1] = gt;
    }
    auto second = [&](int k) -> Tensor {
      if (!ctx->needs_input_grad(2 * k + 1) || !grads[k].defined()) return Tensor();
      if constexpr (Loss::kSecondGradIsNegatedFirst) {
        return g[k].defined() ? g[k].neg() : Tensor();
      } else {
        return Loss::second_grad(k, v[2 * k], v[2 * k + 1], grads[k], sd["alpha"].toTensor(),
                                 sd["saved"].toTensorVector(), options_from_ivalue<Options>(sd["options"]));
      }
    };
    auto first = [&](int k) { return ctx->needs_input_grad(2 * k) ? g[k] : Tensor(); };
    return {first(0), second(0), first(1), second(1), Tensor(), Tensor()};
  }

 private:
  // Whether the forward should write the first input's gradient: the second input's only needs it
  // when it is the negation.
  static bool wants_grad(const Tensor& first, const Tensor& second) {
    return first.requires_grad() || (Loss::kSecondGradIsNegatedFirst && second.requires_grad());
  }
};

// The public op's autograd kernel: the signature csrc/<op>.h declares, the options spread out.
template <typename Loss, typename = typename Loss::Options>
struct TwoSidedLossKernel;
template <typename Loss, typename... Opts>
struct TwoSidedLossKernel<Loss, std::tuple<Opts...>> {
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& s_in, const at::Tensor& s_second,
                                                 const at::Tensor& t_in, const at::Tensor& t_second,
                                                 const at::Tensor& alpha, Opts... options) {
    auto out = Loss::apply(s_in, s_second, t_in, t_second, alpha, typename Loss::Options(options...));
    return {out[0], out[1]};
  }
};

}  // namespace fastadapt
