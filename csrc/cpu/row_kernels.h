// Per-row inner loops of the CPU kernels, compiled once per CPU capability (csrc/cpu/vec/) and picked
// at run time from ATen's own choice, so ATEN_CPU_CAPABILITY governs them as it governs ATen's
// kernels and one wheel runs at AVX-512 speed where it can and anywhere else.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "two_sided.h"

namespace fastadapt::cpu {

// The loss rows work on contiguous float32/float64 rows; bf16 rows are widened into a float scratch
// row first.
template <typename T>
struct LossRowFns {
  // Cross-entropy of one row with label y and label smoothing eps:
  //   (1 - eps) * (lse - x[y]) + eps * (lse - sum(x) / C),
  // F.cross_entropy's formula, so a -inf logit at the label gives +inf rather than inf - inf. Stores
  // the row's log-sum-exp in *lse. When grad is non-null it also writes
  // scale * (softmax(x) - eps/C - (1-eps) * onehot(y)) in the same pass (x is read from DRAM once: the
  // later passes over the row hit the cache). A row whose max is not finite gives NaN, as in ATen.
  // lse is kept in double: with logits near 1e4 a float lse is off by half an ulp of 1e4 (5e-4),
  // which would show up as a 5e-4 relative error in the recomputed softmax. grad may be x itself (the
  // fused linear cross-entropy turns its logits buffer into dlogits in place).
  T (*ce_row)(const T* x, int64_t C, int64_t y, T eps, T* grad, T scale, double* lse);
  // Rows with few classes (C <= kSmallClasses), a block of up to kBlockRows rows at a time with one
  // row per vector lane: the per-row horizontal reductions and tail masks of ce_row cost more than
  // the arithmetic of a 10-class row. y holds the block's labels; rows labelled `ignore` give loss
  // 0, lse 0 and a zero gradient row. grad (nullable) has row stride C; loss gets each row's loss.
  void (*ce_rows_small)(const T* x, int64_t row_stride, int64_t C, const int64_t* y, int64_t rows, int64_t ignore,
                        T eps, T* grad, T scale, double* lse, double* loss);
  // The same gradient from a saved log-sum-exp: one read of x, one write of grad.
  void (*ce_grad_row)(const T* x, int64_t C, int64_t y, T eps, double lse, T scale, T* grad);
  // Cross-entropy of one row with class weights w (null: all 1) and either the class index y (t null)
  // or probability targets t (y unused), F.cross_entropy's formulas:
  //   index: (1 - eps) * w[y] * (lse - x[y]) + eps/C * sum_c w[c] * (lse - x[c])  (the sum only if eps != 0)
  //   probs: sum_c w[c] * ((1 - eps) * t[c] + eps/C) * (lse - x[c])
  // Both have the gradient scale * (K * softmax(x) - q) with q[c] = w[c] * ((1 - eps) * t[c] + eps/C)
  // (t the one-hot of y for an index) and K = sum(q), written when grad is non-null, as by ce_row.
  // These rows are the less common case: the max and the exponentials are vectorised as in ce_row,
  // the sums over t and w and the gradient pass are scalar.
  T (*ce_weighted_row)(const T* x, int64_t C, int64_t y, const T* t, const T* w, T eps, T* grad, T scale,
                       double* lse);
  // That gradient from a saved log-sum-exp.
  void (*ce_weighted_grad_row)(const T* x, int64_t C, int64_t y, const T* t, const T* w, T eps, double lse,
                               T scale, T* grad);
  // Sum of (x-y)^2 over n elements, in double. Optionally writes grad = scale*(x-y) and
  // elem = w*(x-y)^2 in the same pass.
  double (*mse_chunk)(const T* x, const T* y, int64_t n, T* grad, T scale, T* elem, T w);
};

// One row of alpha_weighted_distillation (csrc/alpha_weighted_distillation.h): student logits z (C),
// teacher logits t (K <= C, null when the distillation term is not evaluated), label y (-1 when the
// row has no cross-entropy: ignored label, or alpha = 0).
template <typename T>
struct DistillRow {
  const T* z;
  int64_t C;
  const T* t;
  int64_t K;
  int64_t y;
  T inv_temperature, eps;
  T ce_scale, kd_scale;  // gradient weights: of dCE/dz, and of (p - q) on the first K columns
};

template <typename T>
struct DistillRowFns {
  // The row's cross-entropy (as ce_row) and KL(q || p), q = softmax(t / T), p = softmax(z[:K] / T), in
  // one read of z and t; writes lse = {lse(z), lse(z[:K] / T), lse(t / T)} (double, as ce_row's).
  // When grad is non-null it also writes ce_scale * dCE/dz + kd_scale * (p - q) (p - q on the first K
  // columns) with the exponentials parked in L2, so a row costs one exp per element and term. A term
  // whose row maxima are not finite is NaN and so is the whole gradient row.
  void (*row)(const DistillRow<T>& r, T* grad, double* lse, double* ce, double* kl);
  // The same gradient from the saved log-sum-exps: one read of z and t, one write of grad.
  void (*grad_row)(const DistillRow<T>& r, const double* lse, T* grad);
};

// The epilogue rows of linear_relu, for T in float, double and bfloat16; bf16 works in float and
// rounds once.
template <typename T>
struct DenseRowFns {
  // row = max(row + b, 0) in place (b may be null); NaN stays NaN, as in torch.relu.
  void (*bias_relu)(T* row, const T* b, int64_t n);
  // gm = g where y > 0 or y is NaN (torch.relu's backward zeroes only where y <= 0), else 0; and
  // acc += gm in the accumulation type when acc is non-null. Selecting keeps gm exact in bf16.
  void (*relu_mask)(const T* g, const T* y, T* gm, acc_t<T>* acc, int64_t n);
};

constexpr int64_t kSmallClasses = 32;
constexpr int64_t kBlockRows = 16;

// Every row kernel of one capability.
struct RowKernels {
  LossRowFns<float> loss_float;
  LossRowFns<double> loss_double;
  DenseRowFns<float> dense_float;
  DenseRowFns<double> dense_double;
  DenseRowFns<c10::BFloat16> dense_bfloat16;
  DistillRowFns<float> distill_float;
  DistillRowFns<double> distill_double;
};

// The kernels of the capability ATen runs at, chosen once per process.
const RowKernels& row_kernels();

template <typename T>
const LossRowFns<T>& loss_row_fns() {
  if constexpr (std::is_same_v<T, float>) return row_kernels().loss_float;
  else return row_kernels().loss_double;
}

template <typename T>
const DenseRowFns<T>& dense_row_fns() {
  if constexpr (std::is_same_v<T, float>) return row_kernels().dense_float;
  else if constexpr (std::is_same_v<T, double>) return row_kernels().dense_double;
  else return row_kernels().dense_bfloat16;
}

template <typename T>
const DistillRowFns<T>& distill_row_fns() {
  if constexpr (std::is_same_v<T, float>) return row_kernels().distill_float;
  else return row_kernels().distill_double;
}

// Per-capability builders, defined in csrc/cpu/vec/row_kernels_<cap>.cpp.
namespace DEFAULT { RowKernels make_row_kernels(); }
namespace AVX2 { RowKernels make_row_kernels(); }
namespace AVX512 { RowKernels make_row_kernels(); }

}  // namespace fastadapt::cpu
