// fastadapt::alpha_weighted_linear_cross_entropy and its internal forward op, called through the dispatcher:
// the one place their C++ signatures are written (issue 13, work in progress: CPU kernel only, reduction
// mean/sum only; the Python layer routes reduction none and other devices to its chunked fallback,
// fastadapt/ops/linear_cross_entropy.py). Schemas: alpha_weighted_linear_cross_entropy.cpp; CPU kernel:
// cpu/alpha_weighted_linear_cross_entropy.cpp; autograd: autograd/alpha_weighted_linear_cross_entropy.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "register.h"
#include "two_sided.h"

namespace fastadapt::ops {

// hidden (rows, D) per side (the Python layer flattens leading dimensions), int64 class indices
// (rows,), weight (V, D), bias (V,) or none, all one floating dtype. Returns the loss
//   alpha * L(target) + (1 - alpha) * L(source),
// L = reduction (mean over non-ignored rows, or sum) of CE(softcap(h @ W.T + b), y) + z_loss * lse^2,
// 0-dim in the accumulation type (float32 for bf16). softcap: c * tanh(x / c) when set. chunk_size:
// rows per GEMM chunk (> 0).
inline at::Tensor alpha_weighted_linear_cross_entropy(const at::Tensor& source_hidden, const at::Tensor& source_labels,
                                                      const at::Tensor& target_hidden, const at::Tensor& target_labels,
                                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& alpha, int64_t ignore_index,
                                                      double label_smoothing, int64_t reduction, double z_loss,
                                                      std::optional<double> softcap, int64_t chunk_size) {
  static auto op = FASTADAPT_OP_HANDLE(alpha_weighted_linear_cross_entropy);
  return op.call(source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, ignore_index,
                 label_smoothing, reduction, z_loss, softcap, chunk_size);
}

// The loss and, for each of (source_hidden, target_hidden, weight, bias) whose write_grad flag is set,
// its gradient for a unit grad_output (else a tensor of 0 elements): the weight's and bias's in the
// accumulation type (one fp32 buffer for bf16), the hiddens' in their dtype. The autograd node scales
// them by the grad_output in backward; there is no backward op (the GEMMs are not run twice).
using LinearCeForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LinearCeForward _alpha_weighted_linear_cross_entropy_forward(
    const at::Tensor& source_hidden, const at::Tensor& source_labels, const at::Tensor& target_hidden,
    const at::Tensor& target_labels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t ignore_index, double label_smoothing, int64_t reduction, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, std::array<bool, 4> write_grad) {
  static auto op = FASTADAPT_OP_HANDLE(_alpha_weighted_linear_cross_entropy_forward);
  return op.call(source_hidden, source_labels, target_hidden, target_labels, weight, bias, alpha, ignore_index,
                 label_smoothing, reduction, z_loss, softcap, chunk_size, write_grad);
}

}  // namespace fastadapt::ops
