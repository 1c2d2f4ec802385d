// CUDA kernels of the fused Linear + ReLU.
//
// Forward: y = relu(x @ W.T + b) in one cuBLASLt call (the RELU_BIAS epilogue, through
// at::_addmm_activation), so the pre-activation never makes a round trip to memory; without a bias,
// mm then an in-place relu.
// Backward: the op is GEMM-bound, so the goal is to touch the (M, out) tensors once. One fused kernel
// reads grad_output and the saved output (2*M*out*sizeof(T)), writes the masked gradient
// gm = g * (y > 0) once (M*out*sizeof(T)), and accumulates the bias gradient (column sums of gm) in
// fp32 (fp64 for double) per block into a small (row_chunks, out) workspace; a second tiny kernel sums
// that workspace in a fixed order. Deterministic (no float atomics) and no host sync. Then
// grad_x = gm @ W and grad_W = gm.T @ x via cuBLAS.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>

#include "cuda/common.cuh"
#include "linear_relu.h"
#include "register.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;

constexpr int kCols = 32;        // columns per block (one warp wide: coalesced rows)
constexpr int kRows = 8;         // rows per block step
constexpr int kMaxRowChunks = 256;  // bound on the workspace height

template <typename scalar_t>
__global__ __launch_bounds__(kCols* kRows) void relu_grad_bias_kernel(const scalar_t* __restrict__ g,
                                                                       const scalar_t* __restrict__ y,
                                                                       scalar_t* __restrict__ gm,
                                                                       acc_t<scalar_t>* __restrict__ partial,
                                                                       int64_t M, int64_t N) {
  using A = acc_t<scalar_t>;
  __shared__ A sm[kRows][kCols + 1];
  const int64_t c = int64_t(blockIdx.x) * kCols + threadIdx.x;
  A acc = A(0);
  if (c < N) {
    for (int64_t r = int64_t(blockIdx.y) * kRows + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRows) {
      const int64_t o = r * N + c;
      // zero only where y <= 0: a NaN output passes its gradient on, as torch.relu's backward does
      const scalar_t v = static_cast<A>(y[o]) <= A(0) ? static_cast<scalar_t>(0) : g[o];
      if (gm) gm[o] = v;
      acc += static_cast<A>(v);
    }
  }
  if (partial == nullptr) return;  // uniform: no bias gradient wanted
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    A s = sm[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kRows; ++k) s += sm[k][threadIdx.x];  // fixed order
    partial[int64_t(blockIdx.y) * N + c] = s;
  }
}

template <typename scalar_t>
__global__ void bias_finalize_kernel(const acc_t<scalar_t>* __restrict__ partial, scalar_t* __restrict__ gb,
                                     int64_t chunks, int64_t N) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= N) return;
  acc_t<scalar_t> s = 0;
  for (int64_t k = 0; k < chunks; ++k) s += partial[k * N + c];  // fixed order
  gb[c] = static_cast<scalar_t>(s);
}

// The shapes the kernels index with; user-facing checks are fastadapt/ops/linear_relu.py's.
void check_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "fastadapt CUDA kernel called with ", x.device(), " tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear_relu: x (..., in) and weight (out, in) do not match");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "linear_relu: weight must have x's dtype and device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "linear_relu: bias must be (out,) with x's dtype and device");
  }
}

// x as (rows, in_features), the row count taken from the sizes: reshape({-1, 0}) cannot infer it when
// in_features is 0.
Tensor as_rows(const Tensor& x) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.reshape({rows, x.size(-1)});
}

std::vector<int64_t> out_sizes(const Tensor& x, int64_t out) {
  auto s = x.sizes().vec();
  s.back() = out;
  return s;
}

Tensor linear_relu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_args(x, weight, bias);
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0);
  const Tensor x2d = as_rows(x);
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor y;
  if (in == 0) {
    // an empty reduction: cuBLAS paths may skip the epilogue, so form relu(b) directly
    y = has_bias ? bias->unsqueeze(0).expand({x2d.size(0), out}).relu() : at::zeros({x2d.size(0), out}, x.options());
  } else if (has_bias) {
    y = at::_addmm_activation(*bias, x2d, weight.t(), 1, 1, /*use_gelu=*/false);
  } else {
    y = at::mm(x2d, weight.t());
    y.relu_();
  }
  return y.reshape(out_sizes(x, out));
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_output, const Tensor& x, const Tensor& weight,
                                                        const Tensor& output, std::array<bool, 3> mask) {
  check_args(x, weight, std::nullopt);
  const int64_t in = weight.size(1), out = weight.size(0);
  const auto osz = out_sizes(x, out);
  TORCH_CHECK(output.sizes() == c10::IntArrayRef(osz) && grad_output.sizes() == output.sizes() &&
                  grad_output.scalar_type() == x.scalar_type() && output.scalar_type() == x.scalar_type() &&
                  output.device() == x.device() && grad_output.device() == x.device(),
              "_linear_relu_backward: grad_output and output must be (..., out) with x's dtype and device");
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = x.options();
  const Tensor x2d = as_rows(x);
  const int64_t M = x2d.size(0);
  const Tensor g2 = grad_output.reshape({M, out}).contiguous();
  const Tensor y2 = output.reshape({M, out}).contiguous();
  const bool need_gm = mask[0] || mask[1];
  Tensor gm = need_gm ? at::empty({M, out}, opts) : Tensor();
  Tensor gb = mask[2] ? at::empty({out}, opts) : at::empty({0}, opts);
  if (M == 0 || out == 0) {
    if (mask[2]) gb.zero_();
  } else if (need_gm || mask[2]) {
    const int64_t col_blocks = (out + kCols - 1) / kCols;
    const int64_t chunks = std::min<int64_t>((M + kRows * 16 - 1) / (kRows * 16), kMaxRowChunks);
    TORCH_CHECK(col_blocks < INT_MAX, "linear_relu: too many output features");
    Tensor partial = mask[2] ? at::empty({chunks, out}, opts.dtype(at::toOpMathType(x.scalar_type()))) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_backward_cuda", [&] {
      using A = acc_t<scalar_t>;
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
      const dim3 block(kCols, kRows);
      relu_grad_bias_kernel<scalar_t><<<grid, block, 0, stream>>>(
          g2.const_data_ptr<scalar_t>(), y2.const_data_ptr<scalar_t>(),
          need_gm ? gm.mutable_data_ptr<scalar_t>() : nullptr,
          mask[2] ? partial.mutable_data_ptr<A>() : nullptr, M, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (mask[2]) {
        const int threads = 256;
        bias_finalize_kernel<scalar_t><<<static_cast<unsigned>((out + threads - 1) / threads), threads, 0, stream>>>(
            partial.const_data_ptr<A>(), gb.mutable_data_ptr<scalar_t>(), chunks, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  Tensor gx = mask[0] ? at::mm(gm, weight).reshape(x.sizes()) : at::empty({0}, opts);
  Tensor gw = mask[1] ? at::mm(gm.t(), x2d) : at::empty({0}, opts);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  FASTADAPT_IMPL(m, linear_relu, linear_relu);
  FASTADAPT_IMPL(m, _linear_relu_backward, linear_relu_backward);
}

}  // namespace fastadapt::cuda
