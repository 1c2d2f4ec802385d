// Per-row inner loops of the loss kernels, compiled once per CPU capability (csrc/cpu/vec/) and picked
// at run time like ATen's DispatchStub, so one wheel runs at AVX-512 speed where it can and anywhere else.
// They work on contiguous float32/float64 rows; bf16 rows are widened into a float scratch row first.
#pragma once
#include <cstdint>
#include <type_traits>

namespace fastadapt::cpu {

template <typename T>
struct LossRowFns {
  // Cross-entropy of one row with label y and label smoothing eps. Stores the row's log-sum-exp in
  // *lse and returns lse - (1-eps)*x[y] - eps/C*sum(x). When grad is non-null it also writes
  // scale*(softmax(x) - eps/C - (1-eps)*onehot(y)) in the same pass (x is read from DRAM once: the
  // later passes over the row hit the cache). A row whose max is not finite gives NaN, as in ATen.
  // lse is kept in double: with logits near 1e4 a float lse is off by half an ulp of 1e4 (5e-4),
  // which would show up as a 5e-4 relative error in the recomputed softmax.
  T (*ce_row)(const T* x, int64_t C, int64_t y, T eps, T* grad, T scale, double* lse);
  // Rows with few classes (C <= kSmallClasses), a block of up to kBlockRows rows at a time with one
  // row per vector lane: the per-row horizontal reductions and tail masks of ce_row cost more than
  // the arithmetic of a 10-class row. y holds the block's labels; rows labelled `ignore` give loss
  // 0, lse 0 and a zero gradient row. grad (nullable) has row stride C; loss gets each row's loss.
  void (*ce_rows_small)(const T* x, int64_t row_stride, int64_t C, const int64_t* y, int64_t rows, int64_t ignore,
                        T eps, T* grad, T scale, double* lse, double* loss);
  // The same gradient from a saved log-sum-exp: one read of x, one write of grad.
  void (*ce_grad_row)(const T* x, int64_t C, int64_t y, T eps, double lse, T scale, T* grad);
  // Sum of (x-y)^2 over n elements, in double. Optionally writes grad = scale*(x-y) and
  // elem = w*(x-y)^2 in the same pass.
  double (*mse_chunk)(const T* x, const T* y, int64_t n, T* grad, T scale, T* elem, T w);
};

constexpr int64_t kSmallClasses = 32;
constexpr int64_t kBlockRows = 16;

const LossRowFns<float>& row_fns_float();
const LossRowFns<double>& row_fns_double();

// The kernels for an accumulation type, for code templated on it.
template <typename T>
const LossRowFns<T>& row_fns() {
  if constexpr (std::is_same_v<T, float>) return row_fns_float();
  else return row_fns_double();
}

// Per-capability builders, defined in csrc/cpu/vec/loss_rows_<cap>.cpp.
namespace DEFAULT { LossRowFns<float> fns_float(); LossRowFns<double> fns_double(); }
namespace AVX2 { LossRowFns<float> fns_float(); LossRowFns<double> fns_double(); }
namespace AVX512 { LossRowFns<float> fns_float(); LossRowFns<double> fns_double(); }

}  // namespace fastadapt::cpu
