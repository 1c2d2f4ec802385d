// The conventions every two-sided (source / target) loss op shares, for its CPU and CUDA kernels and
// its autograd node (csrc/autograd/two_sided_loss.h).
//
// A two-sided loss is `alpha * loss(target) + (1 - alpha) * loss(source)`. Its ops return the two
// weighted terms, `(source_term, target_term)`, in the accumulation type (float32 for bf16/fp16
// inputs); the Python layer adds them for reduction mean/sum and rounds the result to the input's
// dtype once.
// A side whose weight is exactly 0 is not evaluated: its inputs are not read in forward or backward,
// so a NaN or an empty batch on that side cannot reach the result.
//
// User-facing argument checks live in Python (fastadapt/ops/_validate.py), in front of both the
// compiled ops and the fallback. The TORCH_CHECKs in C++ only keep a direct torch.ops call from
// reading or writing out of bounds.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace fastadapt {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// What a two-sided loss forward returns: the two weighted terms (accumulation type; 0-dim each for
// mean/sum, the shape of the side's labels or predictions for none), the tensors its backward needs besides the inputs,
// and each side's gradient for a unit grad_output where the kernel wrote it during the forward pass
// (else a tensor of 0 elements).
using LossForward = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>;
// (source gradient, target gradient); a side not asked for comes back with 0 elements.
using SideGrads = std::tuple<at::Tensor, at::Tensor>;

// The accumulation type of a scalar type: float for bfloat16 and float16, itself otherwise.
template <typename T>
using acc_t = at::opmath_type<T>;

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "reduction code must be 0, 1 or 2, got ", reduction);
}

// What every two-sided kernel checks before it reads: the output shapes follow the reduction, and one
// dispatch type serves both sides.
inline void check_two_sided_call(const at::Tensor& source, const at::Tensor& target, int64_t reduction) {
  check_reduction(reduction);
  TORCH_CHECK(source.scalar_type() == target.scalar_type(), "source and target inputs must share a dtype");
}

// Side weights: source 1 - alpha, target alpha. Known on the host when alpha is a CPU tensor;
// a device-resident alpha is read by the kernels (no host sync), and the weight is then unknown here.
// An alpha outside [0, 1] or NaN makes both weights NaN (the Python layer rejects it first; a device
// alpha cannot raise without a sync, so a direct torch.ops call gets NaN outputs on every device).
struct SideWeights {
  std::optional<double> w[2];
  bool skipped(int side) const { return w[side].has_value() && *w[side] == 0.0; }
};

inline double weight_of(double alpha, int side) {
  if (!(alpha >= 0.0 && alpha <= 1.0)) return std::numeric_limits<double>::quiet_NaN();
  return side == 0 ? 1.0 - alpha : alpha;
}

inline SideWeights side_weights(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.numel() == 1, "alpha must have one element");
  SideWeights s;
  if (alpha.is_cpu()) {
    const double a = alpha.item<double>();
    s.w[0] = weight_of(a, 0);
    s.w[1] = weight_of(a, 1);
  }
  return s;
}

// A CPU kernel's weights, always known: its alpha must be a CPU tensor.
inline SideWeights cpu_side_weights(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.is_cpu(), "alpha must be on the CPU for CPU inputs");
  return side_weights(alpha);
}

// What a kernel does about one side's gradient buffer: not asked for (0 elements), zeros (the side's
// weight is 0, or its term has no grad_output), or computed.
enum class GradPlan { kNotWanted, kZeros, kCompute };

inline GradPlan plan_grad(bool wanted, bool skipped, bool has_grad_output = true) {
  if (!wanted) return GradPlan::kNotWanted;
  return skipped || !has_grad_output ? GradPlan::kZeros : GradPlan::kCompute;
}

inline at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// The buffer for that plan: 0 elements, zeros, or memory from `alloc(sizes, options)` for the kernel to
// fill (empty_tensor, or the CPU's gradient cache).
template <typename Alloc>
at::Tensor grad_buffer(GradPlan plan, at::IntArrayRef sizes, const at::TensorOptions& options, Alloc&& alloc) {
  switch (plan) {
    case GradPlan::kNotWanted: return at::empty({0}, options);
    case GradPlan::kZeros: return at::zeros(sizes, options);
    default: return alloc(sizes, options);
  }
}

// One side of a cross-entropy call as the kernels read it: logits as (rows, classes) with unit class
// stride (a copy only when the caller's layout allows no such view); labels either contiguous int64
// class indices (rows) or, when `soft`, contiguous probability targets (rows, classes) in the logits'
// dtype; and the optional class weights (classes), contiguous, in the accumulation type (undefined
// when there are none).
struct CeSide {
  at::Tensor logits, labels, class_weight;
  std::vector<int64_t> logits_sizes, label_sizes;  // label_sizes: the shape of a per-row loss
  int64_t rows = 0, classes = 0, row_stride = 0;
  bool soft = false;
};

// logits (..., C) with labels (...) or probability targets (..., C): the Python layer has already
// moved the class dimension last. weight: (C,) on the logits' device, or none.
inline CeSide make_ce_side(const at::Tensor& logits, const at::Tensor& labels,
                           const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() >= 1, "logits must be (..., C)");
  CeSide d;
  d.soft = labels.is_floating_point();
  d.classes = logits.size(-1);
  d.logits_sizes = logits.sizes().vec();
  if (d.soft) {
    TORCH_CHECK(labels.sizes() == logits.sizes() && labels.scalar_type() == logits.scalar_type(),
                "probability targets must have the logits' shape and dtype");
    d.label_sizes.assign(d.logits_sizes.begin(), d.logits_sizes.end() - 1);
    d.rows = 1;
    for (int64_t s : d.label_sizes) d.rows *= s;
  } else {
    d.label_sizes = labels.sizes().vec();
    d.rows = labels.numel();
    // the per-row loss has the labels' shape, and the fake kernels say logits.shape[:-1]: the two agree
    TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                "labels must have the shape of logits (..., C) without its class dimension");
  }
  TORCH_CHECK(d.classes > 0 || d.rows == 0, "logits with 0 classes must have 0 rows");
  at::Tensor l2 = logits.reshape({d.rows, d.classes});
  if (d.rows > 0 && d.classes > 0 && (l2.stride(1) != 1 || (d.rows > 1 && l2.stride(0) < d.classes))) {
    l2 = l2.contiguous();
  }
  d.logits = l2;
  d.row_stride = d.rows > 1 ? l2.stride(0) : d.classes;
  d.labels = d.soft ? labels.reshape({d.rows, d.classes}).contiguous()
                     : labels.reshape({d.rows}).to(at::kLong).contiguous();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == d.classes && weight->device() == logits.device(),
                "weight must be one value per class, on the logits' device");
    d.class_weight = weight->to(at::toOpMathType(logits.scalar_type())).contiguous();
  }
  return d;
}

// F.cross_entropy's divisor for reduction mean of a CPU side: the number of rows whose label is not
// ignore_index, the sum of their classes' weights with class weights, the number of rows with
// probability targets. A label outside [0, classes) would index out of its row: IndexError, before any
// arithmetic (the Python layer then names the argument).
inline double mean_divisor(const CeSide& d, int64_t ignore) {
  if (d.soft) return double(d.rows);
  const at::Tensor w = d.class_weight.defined() ? d.class_weight.to(at::kDouble) : at::Tensor();
  const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
  const int64_t* y = d.labels.const_data_ptr<int64_t>();
  double n = 0.0;
  for (int64_t i = 0; i < d.rows; ++i) {
    if (y[i] == ignore) continue;
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < d.classes, "label ", y[i], " at flat position ", i, " is outside [0, ",
                      d.classes, ")");
    n += wp ? wp[y[i]] : 1.0;
  }
  return n;
}

// One side of an MSE call: prediction and target flat and contiguous.
struct MseSide {
  at::Tensor pred, target;
  std::vector<int64_t> sizes;
  int64_t n = 0;
};

inline MseSide make_mse_side(const at::Tensor& pred, const at::Tensor& target) {
  TORCH_CHECK(pred.sizes() == target.sizes() && pred.scalar_type() == target.scalar_type(),
              "pred and target must have one shape and one dtype");
  MseSide d;
  d.sizes = pred.sizes().vec();
  d.n = pred.numel();
  d.pred = pred.reshape({-1}).contiguous();
  d.target = target.reshape({-1}).contiguous();
  return d;
}

}  // namespace fastadapt
