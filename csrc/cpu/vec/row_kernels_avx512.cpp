// AVX-512 build of the row kernels (see row_kernels_impl.h).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's _mm512_undefined_ps/pd/si512 (the don't-care pass-through operand of every unmasked AVX-512
// intrinsic: _mm512_max_ps, _mm512_shuffle_f32x4, ...) initialise a variable with itself, and once
// at::vec's wrappers are inlined at -O3 each use is reported inside avx512fintrin.h as -Wuninitialized
// or -Wmaybe-uninitialized (GCC bug 105593, fixed in GCC 13): several hundred reports, none about a
// value this code reads. Silenced for this translation unit only, before the intrinsics' header, for
// those compilers only; the same row code is compiled with both warnings on for DEFAULT and AVX2.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
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
