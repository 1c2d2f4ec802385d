// Run-time choice of the per-capability row kernels; honours ATEN_CPU_CAPABILITY like ATen does.
#include <string>
#include "cpu/loss_rows.h"

#include <ATen/Version.h>

namespace fastadapt::cpu {
namespace {
template <typename T, typename D, typename A2, typename A5>
LossRowFns<T> pick(D dflt, A2 avx2, A5 avx512) {
  // ATen's own choice ("AVX512", "AVX2", "DEFAULT", ...), so ATEN_CPU_CAPABILITY overrides it for us too.
  const std::string cap = at::get_cpu_capability();
#if defined(__x86_64__) || defined(_M_X64)
  if (cap == "AVX512") return avx512();
  if (cap == "AVX2" || cap == "AVX512") return avx2();
#endif
  return dflt();
}
}  // namespace

const LossRowFns<float>& row_fns_float() {
  static const LossRowFns<float> fns = pick<float>(DEFAULT::fns_float, AVX2::fns_float, AVX512::fns_float);
  return fns;
}
const LossRowFns<double>& row_fns_double() {
  static const LossRowFns<double> fns = pick<double>(DEFAULT::fns_double, AVX2::fns_double, AVX512::fns_double);
  return fns;
}
}  // namespace fastadapt::cpu
