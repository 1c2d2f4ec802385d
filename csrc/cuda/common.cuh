// Device helpers shared by the fastadapt CUDA kernels: 16-byte vector access, accumulation types,
// fixed-order (deterministic) reductions and the alpha / side-weight convention.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "two_sided.h"

namespace fastadapt::cuda {

constexpr int kVecBytes = 16;

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int N = kVecBytes / sizeof(T);
  T v[N];
};

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float dlog(float x) { return __logf(x); }
__device__ __forceinline__ double dlog(double x) { return ::log(x); }

template <typename A>
__device__ __forceinline__ A dinf() {
  return std::numeric_limits<A>::infinity();
}
template <typename A>
__device__ __forceinline__ A dnan() {
  return std::numeric_limits<A>::quiet_NaN();
}

// alpha: read from device memory when `dev` is set (a device-resident alpha, so a schedule can change
// it between steps without a host sync or a recompile), else the host value.
struct AlphaArg {
  const double* dev = nullptr;
  double host = 0.0;
};

// Side weight, as weight_of() in two_sided.h: source 1-alpha, target alpha; an alpha outside [0, 1]
// (or NaN) cannot raise on the device without a host sync, so it makes the weight NaN and with it
// every output of the call.
__device__ __forceinline__ double side_weight(const AlphaArg& a, int side) {
  const double v = a.dev ? *a.dev : a.host;
  if (!(v >= 0.0 && v <= 1.0)) return std::numeric_limits<double>::quiet_NaN();
  return side == 0 ? 1.0 - v : v;
}

// Host side: a CPU alpha is passed by value; a device alpha is widened to double on the stream (no
// sync). `keep` holds the widened copy alive until the launches are queued.
inline AlphaArg make_alpha_arg(const at::Tensor& alpha, at::Tensor& keep) {
  AlphaArg a;
  if (alpha.is_cpu()) {
    a.host = alpha.item<double>();
  } else {
    keep = alpha.reshape({}).to(at::kDouble).contiguous();
    a.dev = keep.const_data_ptr<double>();
  }
  return a;
}

// Every tensor of a call on the kernel's device (alpha may also be a CPU tensor).
inline void check_on_device(std::initializer_list<const at::Tensor*> tensors, const at::Tensor& alpha) {
  const auto dev = (*tensors.begin())->device();
  TORCH_CHECK(dev.is_cuda(), "fastadapt CUDA kernel called with ", dev, " tensors");
  for (const at::Tensor* t : tensors) TORCH_CHECK(t->device() == dev, "all inputs must be on ", dev);
  TORCH_CHECK(alpha.is_cpu() || alpha.device() == dev, "alpha must be on the CPU or on ", dev);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % kVecBytes) == 0; }

// Sum over a block in a fixed order (tree over warps, then over the warps' results). All threads
// must call it; the result is valid in every thread. `smem` needs blockDim.x / 32 entries.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? smem[lane] : T(0);
  r = warp_sum(r);
  return r;
}

// Maximum over a block, as block_sum; a NaN anywhere makes the result NaN (the losses must not
// hide it).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
__device__ T block_max(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? smem[lane] : -dinf<T>();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) r = nan_max(r, __shfl_xor_sync(0xffffffffu, r, o));
  return r;
}

}  // namespace fastadapt::cuda
