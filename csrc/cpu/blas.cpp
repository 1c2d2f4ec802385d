// Finds the Fortran-interface sgemm_/dgemm_ that libtorch_cpu links. ATen calls these with 32-bit
// integers (LP64), so whatever library answers to that name takes ints here too.
#include "blas.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_ops.h>
#include <dlfcn.h>

#include <climits>

namespace fastadapt::cpu::blas {
namespace {

template <typename T>
using gemm_fn = void(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                     const T*, const int*, const T*, T*, const int*);

// at::_ops::empty_memory_format::call is defined in libtorch_cpu (at::empty itself is inline, so its
// address would be this library's); dlsym on that library's handle also searches its dependencies, so
// a BLAS linked dynamically (OpenBLAS builds) is found as well.
void* lookup(const char* name) {
  Dl_info info{};
  void* anchor = reinterpret_cast<void*>(&at::_ops::empty_memory_format::call);
  if (dladdr(anchor, &info) == 0 || info.dli_fname == nullptr) return nullptr;
  void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return nullptr;
  void* sym = dlsym(handle, name);
  dlclose(handle);  // RTLD_NOLOAD took a reference on an already loaded library; give it back
  return sym;
}

template <typename T>
gemm_fn<T>* resolve();
template <>
gemm_fn<float>* resolve<float>() {
  static auto* fn = reinterpret_cast<gemm_fn<float>*>(lookup("sgemm_"));
  return fn;
}
template <>
gemm_fn<double>* resolve<double>() {
  static auto* fn = reinterpret_cast<gemm_fn<double>*>(lookup("dgemm_"));
  return fn;
}

}  // namespace

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <typename T>
bool available() {
  return resolve<T>() != nullptr;
}

// Row-major C = A @ B is column-major C^T = B^T @ A^T: a row-major operand read column-major is
// already its transpose, so B goes first and each operand keeps its own transpose flag.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, Operand<T> a, Operand<T> b, T* c, int64_t ldc) {
  const char ta = b.trans ? 'T' : 'N', tb = a.trans ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), lda = int(b.ld), ldb = int(a.ld), ldC = int(ldc);
  const T one = 1, zero = 0;
  resolve<T>()(&ta, &tb, &M, &N, &K, &one, b.p, &lda, a.p, &ldb, &zero, c, &ldC);
}

template bool available<float>();
template bool available<double>();
template void gemm<float>(int64_t, int64_t, int64_t, Operand<float>, Operand<float>, float*, int64_t);
template void gemm<double>(int64_t, int64_t, int64_t, Operand<double>, Operand<double>, double*, int64_t);

}  // namespace fastadapt::cpu::blas
