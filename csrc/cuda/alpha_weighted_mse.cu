// CUDA kernels of the alpha-weighted MSE:
//   loss = alpha * MSE(target_pred, target_target) + (1 - alpha) * MSE(source_pred, source_target)
//
// What it fuses: the difference, the square, the per-side reduction, the alpha weighting and (on
// request) the gradient, in one elementwise pass per side. Bytes: forward reads pred and target once
// (2n*sizeof(T)) and writes only per-block partial sums (reduction mean/sum; 8 bytes per block) or
// the weighted per-element losses (reduction none, n*sizeof(T)); backward reads pred and target once
// and writes the gradient once (3n*sizeof(T), plus n for an elementwise grad_output).
// Reductions are deterministic: a fixed number of blocks per side (a function of n only) each write a
// double partial, and one finalize block sums them in a fixed order; no float atomics.
// No host sync: a device alpha and a device grad_output are read by the kernels. A device alpha
// outside [0, 1] (or NaN) makes every output NaN (see side_weight in common.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "alpha_weighted_mse.h"
#include "cuda/common.cuh"
#include "register.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksPerSide = 1024;

struct MseSideDev {
  const void* pred = nullptr;
  const void* target = nullptr;
  int64_t n = 0;
  int64_t block_begin = 0, nblocks = 0;  // this side's blocks in the grid / in the partials
  bool vec = false;                      // every pointer of this side is 16-byte aligned
  void* out_none = nullptr;              // acc_t (n,) weighted squared errors (reduction none), or null
  void* grad = nullptr;                  // scalar_t (n,) gradient wrt pred, or null
  const void* g_elem = nullptr;          // acc_t (n,) elementwise grad_output (reduction none), or null
  const double* g_dev = nullptr;         // scalar grad_output on the device, else g_host
  double g_host = 1.0;
};

struct MseArgs {
  MseSideDev s[2];
  AlphaArg alpha;
  int reduction = kMean;
  double* partials = nullptr;  // one per block (reduction mean/sum forward), or null
};

template <typename scalar_t>
__global__ __launch_bounds__(kThreads) void mse_kernel(const MseArgs p) {
  using A = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int VN = V::N;
  __shared__ double smem[kThreads / 32];
  const int sd = blockIdx.x >= p.s[0].nblocks ? 1 : 0;
  const MseSideDev& d = sd ? p.s[1] : p.s[0];
  const int64_t blk = int64_t(blockIdx.x) - d.block_begin;
  const double w = side_weight(p.alpha, sd);
  const bool zero = w == 0.0;  // uniform across the block
  const scalar_t* x = static_cast<const scalar_t*>(d.pred);
  const scalar_t* y = static_cast<const scalar_t*>(d.target);
  A* out = static_cast<A*>(d.out_none);
  scalar_t* grad = static_cast<scalar_t*>(d.grad);
  const A* ge = static_cast<const A*>(d.g_elem);
  // d loss / d pred = g * 2w (d / n for mean); formed in double, rounded once to the acc type
  const double base = p.reduction == kMean ? 2.0 * w / static_cast<double>(d.n) : 2.0 * w;
  const A k_scalar = static_cast<A>((d.g_dev ? *d.g_dev : d.g_host) * base);
  const A k_elem = static_cast<A>(2.0 * w);
  const A wa = static_cast<A>(w);

  double acc = 0.0;  // fp64 adds are free in a memory-bound loop and keep long per-thread sums accurate
  auto one = [&](A xv, A yv, A gv, A& o_out, scalar_t& o_grad) {
    const A diff = xv - yv;
    const A d2 = diff * diff;
    acc += static_cast<double>(d2);
    o_out = zero ? A(0) : d2 * wa;
    o_grad = static_cast<scalar_t>(zero ? A(0) : diff * (ge ? gv * k_elem : k_scalar));
  };

  const int64_t tid = blk * kThreads + threadIdx.x;
  const int64_t nthreads = d.nblocks * kThreads;
  int64_t scalar_begin = 0;
  if (d.vec) {
    const int64_t nvec = d.n / VN;
    scalar_begin = nvec * VN;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      const int64_t e = v * VN;
      V xv, yv, gr;
      A ov[VN];
      *reinterpret_cast<uint4*>(&xv) = __ldg(reinterpret_cast<const uint4*>(x + e));
      *reinterpret_cast<uint4*>(&yv) = __ldg(reinterpret_cast<const uint4*>(y + e));
#pragma unroll
      for (int k = 0; k < VN; ++k) {
        one(static_cast<A>(xv.v[k]), static_cast<A>(yv.v[k]), ge ? ge[e + k] : A(0), ov[k], gr.v[k]);
      }
      if (out) {
#pragma unroll
        for (int k = 0; k < VN; ++k) out[e + k] = ov[k];  // the accumulation type: not one 16-byte vector
      }
      if (grad) *reinterpret_cast<uint4*>(grad + e) = *reinterpret_cast<const uint4*>(&gr);
    }
  }
  for (int64_t e = scalar_begin + tid; e < d.n; e += nthreads) {
    A o;
    scalar_t gr;
    one(static_cast<A>(x[e]), static_cast<A>(y[e]), ge ? ge[e] : A(0), o, gr);
    if (out) out[e] = o;
    if (grad) grad[e] = gr;
  }
  if (p.partials) {
    const double total = block_sum(acc, smem);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
  }
}

constexpr int kFinalizeThreads = 512;

// One block: each side's weighted term from its blocks' partial sums, in a fixed order.
template <typename scalar_t>
__global__ __launch_bounds__(kFinalizeThreads) void mse_finalize_kernel(const MseArgs p, acc_t<scalar_t>* term_s,
                                                                         acc_t<scalar_t>* term_t) {
  __shared__ double smem[kFinalizeThreads / 32];
  for (int sd = 0; sd < 2; ++sd) {
    const MseSideDev& d = p.s[sd];
    const double w = side_weight(p.alpha, sd);
    double term = 0.0;
    if (w != 0.0) {  // uniform; a zero-weight term is not evaluated
      double sum = 0.0;
      for (int64_t b = threadIdx.x; b < d.nblocks; b += blockDim.x) sum += p.partials[d.block_begin + b];
      sum = block_sum(sum, smem);
      term = p.reduction == kMean ? w * (sum / static_cast<double>(d.n)) : w * sum;
    }
    if (threadIdx.x == 0) *(sd == 0 ? term_s : term_t) = static_cast<acc_t<scalar_t>>(term);
  }
}

int64_t blocks_for(int64_t n, int vn) {
  const int64_t per_block = int64_t(kThreads) * vn * 4;  // about 4 vectors per thread before capping
  return std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocksPerSide);
}

// The sides' block ranges in the grid; a side that runs no blocks (weight known to be 0, or nothing
// to compute in backward) gets none.
void assign_blocks(MseArgs& p, const std::array<bool, 2>& run, int vn) {
  int64_t begin = 0;
  for (int k = 0; k < 2; ++k) {
    MseSideDev& d = p.s[k];
    d.nblocks = run[k] ? blocks_for(d.n, vn) : 0;
    d.block_begin = begin;
    begin += d.nblocks;
    // the per-element losses and grad_output (acc_t) are accessed element by element: no constraint
    d.vec = aligned16(d.pred) && aligned16(d.target) && aligned16(d.grad);
  }
}

void launch(const MseArgs& p, at::ScalarType dtype, std::array<Tensor, 2>* terms, cudaStream_t stream) {
  const int64_t blocks = p.s[0].nblocks + p.s[1].nblocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "alpha_weighted_mse_cuda", [&] {
    if (blocks > 0) {
      mse_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (terms) {
      mse_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
          p, (*terms)[0].mutable_data_ptr<acc_t<scalar_t>>(), (*terms)[1].mutable_data_ptr<acc_t<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// What forward and backward both need: the flattened sides and the parameters that do not depend on
// the pass. Keeps the tensors the parameters point into alive.
struct MseCall {
  Tensor alpha_keep;
  std::array<MseSide, 2> h;
  MseArgs p;
  SideWeights w;
};

MseCall prepare_call(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha,
                     int64_t reduction) {
  check_two_sided_call(sp, tp, reduction);
  check_on_device({&sp, &st, &tp, &tt}, alpha);
  MseCall c{Tensor(), {make_mse_side(sp, st), make_mse_side(tp, tt)}, MseArgs(), side_weights(alpha)};
  c.p.alpha = make_alpha_arg(alpha, c.alpha_keep);
  c.p.reduction = static_cast<int>(reduction);
  for (int k = 0; k < 2; ++k) {
    c.p.s[k].pred = c.h[k].pred.const_data_ptr();
    c.p.s[k].target = c.h[k].target.const_data_ptr();
    c.p.s[k].n = c.h[k].n;
  }
  return c;
}

int vec_elems(at::ScalarType t) { return kVecBytes / static_cast<int>(c10::elementSize(t)); }

LossForward forward(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha,
                    int64_t reduction, std::array<bool, 2> write_grad) {
  c10::cuda::CUDAGuard device_guard(sp.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MseCall call = prepare_call(sp, st, tp, tt, alpha, reduction);
  MseArgs& p = call.p;
  const auto opts = sp.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(sp.scalar_type()));  // terms in the accumulation type
  std::array<Tensor, 2> terms, grads;
  Tensor partials;
  for (int k = 0; k < 2; ++k) {
    const bool skipped = call.w.skipped(k);
    if (reduction == kNone) {
      terms[k] = grad_buffer(plan_grad(true, skipped), call.h[k].sizes, acc_opts, empty_tensor);
      if (!skipped) p.s[k].out_none = terms[k].mutable_data_ptr();
    } else {
      terms[k] = at::empty({}, acc_opts);
    }
    const GradPlan plan = plan_grad(write_grad[k], skipped);
    grads[k] = grad_buffer(plan, call.h[k].sizes, opts, empty_tensor);
    if (plan == GradPlan::kCompute) {
      p.s[k].grad = grads[k].mutable_data_ptr();
      p.s[k].g_host = 1.0;
    }
  }
  assign_blocks(p, {!call.w.skipped(0), !call.w.skipped(1)}, vec_elems(sp.scalar_type()));
  if (reduction != kNone) {
    partials = at::empty({std::max<int64_t>(p.s[0].nblocks + p.s[1].nblocks, 1)}, opts.dtype(at::kDouble));
    p.partials = partials.mutable_data_ptr<double>();
  }
  launch(p, sp.scalar_type(), reduction != kNone ? &terms : nullptr, stream);
  return {terms[0], terms[1], {}, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                                          const Tensor& alpha, int64_t reduction) {
  auto out = forward(sp, st, tp, tt, alpha, reduction, {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

SideGrads backward(const std::optional<Tensor>& g_s, const std::optional<Tensor>& g_t, const Tensor& sp,
                   const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha, at::TensorList saved,
                   int64_t reduction, std::array<bool, 2> mask) {
  c10::cuda::CUDAGuard device_guard(sp.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MseCall call = prepare_call(sp, st, tp, tt, alpha, reduction);
  TORCH_CHECK(saved.empty(), "saved must be the forward's (empty) list");
  MseArgs& p = call.p;
  const auto opts = sp.options();
  const auto acc = at::toOpMathType(sp.scalar_type());
  const std::array<const std::optional<Tensor>*, 2> gout = {&g_s, &g_t};
  std::array<Tensor, 2> grads, keep;
  std::array<bool, 2> run{};
  for (int k = 0; k < 2; ++k) {
    const std::optional<Tensor>& go = *gout[k];
    const GradPlan plan = plan_grad(mask[k], call.w.skipped(k), go.has_value() && go->defined());
    grads[k] = grad_buffer(plan, call.h[k].sizes, opts, empty_tensor);
    run[k] = plan == GradPlan::kCompute;
    if (!run[k]) continue;
    p.s[k].grad = grads[k].mutable_data_ptr();
    const Tensor& g = *go;
    const bool scalar_g = reduction != kNone ||
                          (g.numel() > 0 && std::all_of(g.strides().begin(), g.strides().end(),
                                                        [](int64_t s) { return s == 0; }));
    if (reduction == kNone) {
      TORCH_CHECK(g.numel() == p.s[k].n, "grad_output of a per-element loss must have one element per element");
    } else {
      TORCH_CHECK(g.numel() == 1, "grad_output of a reduced loss must have one element");
    }
    if (scalar_g) {
      // one value (also an expanded grad_output, stride 0 everywhere: read it once, not n times)
      if (g.is_cpu()) {
        p.s[k].g_host = g.reshape({-1}).select(0, 0).item<double>();  // host memory: no device sync
      } else {
        keep[k] = g.as_strided({}, {}).to(at::kDouble).contiguous();
        p.s[k].g_dev = keep[k].const_data_ptr<double>();
      }
    } else {
      // in the accumulation type: the per-element grad_output is not rounded to the input's dtype
      keep[k] = g.to(sp.device(), acc).contiguous();
      p.s[k].g_elem = keep[k].const_data_ptr();
    }
  }
  assign_blocks(p, run, vec_elems(sp.scalar_type()));
  launch(p, sp.scalar_type(), nullptr, stream);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  FASTADAPT_IMPL(m, alpha_weighted_mse, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_mse_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_mse_backward, backward);
}

}  // namespace fastadapt::cuda
