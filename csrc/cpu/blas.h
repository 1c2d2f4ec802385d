// Direct calls into the BLAS that libtorch_cpu itself uses (MKL in the x86 wheels), for the small
// GEMMs of a Linear layer. At an MNIST-MLP size at::mm_out's own work per call (dispatch, checks,
// its transposition logic) is a measurable share of the GEMM (BENCHMARKS.md, issue 3), and it cannot
// be run on one thread per slice of the output. Found at load time; when it is missing (another BLAS, another
// platform) `available()` is false and callers keep at::mm.
#pragma once
#include <cstdint>
#include <type_traits>

namespace fastadapt::cpu::blas {

// A row-major matrix operand: element (i, j) is p[i * ld + j], or p[j * ld + i] when `trans`.
template <typename T>
struct Operand {
  const T* p;
  int64_t ld;
  bool trans;
};

// The types a BLAS gemm exists for; every call site is guarded by it (`if constexpr`).
template <typename T>
inline constexpr bool supported = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
bool available();

// C (m x n, row-major, leading dimension ldc) = A (m x k) @ B (k x n), overwriting C. Runs on the
// calling thread when called inside a parallel region. Sizes and leading dimensions must fit in int
// (see fits_int) and m, n, k must be positive.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, Operand<T> a, Operand<T> b, T* c, int64_t ldc);

bool fits_int(int64_t v);

}  // namespace fastadapt::cpu::blas
