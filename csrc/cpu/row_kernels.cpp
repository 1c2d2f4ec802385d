// Run-time choice of the per-capability row kernels: ATen's own (at::get_cpu_capability), so
// ATEN_CPU_CAPABILITY overrides it for fastadapt too.
#include "cpu/row_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace fastadapt::cpu {

const RowKernels& row_kernels() {
  static const RowKernels kernels = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(__x86_64__) || defined(_M_X64)
    if (cap == "AVX512") return AVX512::make_row_kernels();
    if (cap == "AVX2") return AVX2::make_row_kernels();
#endif
    return DEFAULT::make_row_kernels();
  }();
  return kernels;
}

}  // namespace fastadapt::cpu
