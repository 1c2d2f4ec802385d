// fastadapt::alpha_weighted_linear_cross_entropy and its internal forward and backward ops, called
// through the dispatcher: the one place their C++ signatures are written. Schemas:
// alpha_weighted_linear_cross_entropy.cpp; the chunked algorithm: chunked_linear_ce.h; kernels:
// cpu/ and cuda/alpha_weighted_linear_cross_entropy.*; autograd: autograd/alpha_weighted_linear_cross_entropy.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "register.h"
#include "two_sided.h"

namespace fastadapt::ops {

// hidden (rows, D) per side (the Python layer flattens leading dimensions), int64 class indices
// (rows,), weight (V, D), bias (V,) or none, all one floating dtype; alpha 0-dim (CPU, or the inputs'
// device). The loss is alpha * L(target) + (1 - alpha) * L(source) with
// L = reduction of CE(softcap(h @ W.T + b), y) + z_loss * lse^2 per non-ignored row (softcap: c * tanh(x / c)
// when set), computed chunk_size rows at a time. Returns, in the accumulation type (float32 for bf16):
// reduction mean/sum: (loss 0-dim, 0 elements); none: (source losses (rows,), target losses (rows,)),
// already weighted, 0 at ignored rows.
using LinearCeOut = std::tuple<at::Tensor, at::Tensor>;

inline LinearCeOut alpha_weighted_linear_cross_entropy(
    const at::Tensor& source_hidden, const at::Tensor& source_labels, const at::Tensor& target_hidden,
    const at::Tensor& target_labels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t ignore_index, double label_smoothing, int64_t reduction, double z_loss,
    std::optional<double> softcap, int64_t chunk_size) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_linear_cross_entropy);
  return op.call(source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, ignore_index,
                 label_smoothing, reduction, z_loss, softcap, chunk_size);
}

// The two outputs above and, for reduction mean/sum, each gradient of (source_hidden, target_hidden,
// weight, bias) whose write_grad flag is set, for a unit grad_output (else 0 elements): the hiddens' in
// their dtype, the weight's and bias's in the accumulation type (one fp32 buffer for bf16). The
// autograd node scales them by the grad_output. Reduction none writes no gradient here.
using LinearCeForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LinearCeForward _alpha_weighted_linear_cross_entropy_forward(
    const at::Tensor& source_hidden, const at::Tensor& source_labels, const at::Tensor& target_hidden,
    const at::Tensor& target_labels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t ignore_index, double label_smoothing, int64_t reduction, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, std::array<bool, 4> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_linear_cross_entropy_forward);
  return op.call(source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, ignore_index,
                 label_smoothing, reduction, z_loss, softcap, chunk_size, write_grad);
}

// Reduction none's backward: the gradients of sum(grad_source * source_losses) + sum(grad_target *
// target_losses) for each input whose write_grad flag is set (else 0 elements), by a second chunked pass
// (one grad_output per row, so they cannot be written in the forward). An undefined grad_* side adds
// nothing. Returns (source_hidden, target_hidden, weight, bias) gradients, dtypes as in the forward.
using LinearCeGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LinearCeGrads _alpha_weighted_linear_cross_entropy_backward(
    const std::optional<at::Tensor>& grad_source, const std::optional<at::Tensor>& grad_target,
    const at::Tensor& source_hidden, const at::Tensor& source_labels, const at::Tensor& target_hidden,
    const at::Tensor& target_labels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, std::array<bool, 4> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_linear_cross_entropy_backward);
  return op.call(grad_source, grad_target, source_hidden, source_labels, target_hidden, target_labels, weight,
                 bias, alpha, ignore_index, label_smoothing, z_loss, softcap, chunk_size, write_grad);
}

}  // namespace fastadapt::ops
