// AVX2 build of the row kernels (see row_kernels_impl.h).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// sleef.h declares its vector functions by the ISA macros, which the pragma alone does not set.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/vec/row_kernels_impl.h"
#else
#include "cpu/row_kernels.h"
namespace fastadapt::cpu::AVX2 {
RowKernels make_row_kernels() { return DEFAULT::make_row_kernels(); }
}  // namespace fastadapt::cpu::AVX2
#endif
