// AVX-512 build of the row kernels (see row_kernels_impl.h).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/vec/row_kernels_impl.h"
#else
#include "cpu/row_kernels.h"
namespace fastadapt::cpu::AVX512 {
RowKernels make_row_kernels() { return DEFAULT::make_row_kernels(); }
}  // namespace fastadapt::cpu::AVX512
#endif
