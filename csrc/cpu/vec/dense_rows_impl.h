// Body of linear_relu's epilogue rows (see DenseRowFns in cpu/row_kernels.h). Plain loops: each
// per-capability file compiles them for its own ISA, and the compiler vectorises them there (the
// generic at::vec types would not: they are only fast inside ATen's own per-capability build).
#include <cstdint>

#include "cpu/row_kernels.h"

namespace fastadapt::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
void bias_relu(T* __restrict row, const T* __restrict b, int64_t n) {
  using A = acc_t<T>;
  if (b) {
    for (int64_t c = 0; c < n; ++c) {
      const A v = A(row[c]) + A(b[c]);
      row[c] = T(v < A(0) ? A(0) : v);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const A v = A(row[c]);
      row[c] = T(v < A(0) ? A(0) : v);
    }
  }
}

template <typename T>
void relu_mask(const T* __restrict g, const T* __restrict y, T* __restrict gm, acc_t<T>* __restrict acc, int64_t n) {
  using A = acc_t<T>;
  if (acc) {
    for (int64_t c = 0; c < n; ++c) {
      const A m = A(y[c]) <= A(0) ? A(0) : A(g[c]);
      gm[c] = T(m);
      acc[c] += m;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) gm[c] = A(y[c]) <= A(0) ? T(0) : g[c];
  }
}

template <typename T>
DenseRowFns<T> dense_fns() {
  return DenseRowFns<T>{&bias_relu<T>, &relu_mask<T>};
}

}  // namespace
}  // namespace fastadapt::cpu::CPU_CAPABILITY
