// CUDA kernels of the alpha-weighted distillation (csrc/alpha_weighted_distillation.h):
//   loss = alpha * CE(z, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(z[:, :K] / T))
//
// Design for bytes: forward + backward read z twice and t twice and write the gradient once, nothing
// else of size N*C (no softmax is materialised):
//   forward:  one sweep over each row keeps three online (max, rescaled sum) pairs: of z (cross-entropy,
//             all C columns), of z[:K] / T and of t / T, the last with the rescaled sum of
//             exp(a - max a) * (t - z) / T that gives the KL; a NaN flag per term. Writes per-row
//             log-sum-exps (float64, as csrc/cpu/row_kernels.h says why) and losses: O(N).
//   finalize: one block sums the row losses and counts non-ignored rows in a fixed order (no float
//             atomics: bitwise reproducible) and writes the two weighted terms.
//   backward: a second sweep over each row writes
//             s_ce * (softmax(z) - eps/C - (1-eps) onehot(y)) + s_kd * (p - q) (p - q on the first K)
//             from the saved log-sum-exps. The autograd node does not ask the forward for the gradient
//             on a GPU (re-reading runs at HBM speed); asked directly, the forward runs this kernel with
//             unit grad_outputs.
// A row is handled by a warp (C <= kWarpClasses) or a 256-thread block; threads stride the row, so
// loads are coalesced; all offsets are int64. Nothing synchronises with the host: the count, scalar
// grad_outputs and a device alpha are read by the kernels, with the conventions of the cross-entropy
// kernels (alpha_weighted_cross_entropy.cu): a label outside [0, C) that is not ignore_index makes its
// row's cross-entropy NaN, and a device alpha outside [0, 1] makes every output NaN.
//
// Unverified on hardware: this file has been compiled, never run (no GPU on the development machine).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "alpha_weighted_distillation.h"
#include "cuda/common.cuh"
#include "register.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;

constexpr int64_t kWarpClasses = 2048;
constexpr int kBlockThreads = 256;

// One term's grad_output: per row (reduction none; acc_t, strided), a scalar on the device, or a host
// value. `on` is false for a term that has none (it adds nothing to the gradient).
struct TermGrad {
  bool on = false;
  const void* rows = nullptr;
  int64_t stride = 0;
  const double* dev = nullptr;
  double host = 1.0;
};

struct DistillDev {
  const void* z = nullptr;        // (rows, C), class stride 1
  const void* t = nullptr;        // (rows, K), class stride 1
  const int64_t* y = nullptr;     // (rows,)
  int64_t rows = 0, C = 0, K = 0, z_stride = 0, t_stride = 0;
  int64_t ignore = -100;
  double inv_t = 1.0, t2 = 1.0, temperature = 1.0, eps = 0.0;
  int reduction = kMean;
  AlphaArg alpha;
  double* stats = nullptr;        // (rows, 3): lse(z), lse(z[:K] / T), lse(t / T), written by the forward
  const double* lse = nullptr;    // the same, read by the backward
  void* row_ce = nullptr;         // acc_t (rows,) unweighted (reduction mean/sum), or null
  void* row_kl = nullptr;
  void* none_kd = nullptr;        // acc_t (rows,) weighted (reduction none), or null
  void* none_ce = nullptr;
  void* grad = nullptr;           // scalar_t (rows, C) contiguous (backward)
  const int64_t* count = nullptr; // (1,) non-ignored rows (backward)
  TermGrad g_kd, g_ce;
};

// A thread's running statistics of one row. Plain data (no constructor), so a block can keep them in
// shared memory; init() starts them.
template <typename A>
struct Stats {
  A mz, sz;      // max of z and sum of exp(z - mz): the cross-entropy's log-sum-exp
  A mb, sb;      // the same of b = z[:K] / T
  A ma, sa, sd;  // of a = t / T, and the sum of exp(a - ma) * (t - z) / T
  double sx;     // sum of z (label smoothing), in double as the cross-entropy kernel's
  int nan_z, nan_k;
};

template <typename A>
__device__ __forceinline__ Stats<A> init() {
  const A ninf = -dinf<A>();
  return Stats<A>{ninf, A(0), ninf, A(0), ninf, A(0), A(0), 0.0, 0, 0};
}

// a * r, where r == 0 is a teacher weight that underflowed: 0 even when a is +inf (a student logit of
// -inf), since 0 * log 0 = 0 in the KL, as F.kl_div and the CPU kernel have it
template <typename A>
__device__ __forceinline__ A vanish(A a, A r) {
  return r == A(0) ? A(0) : a * r;
}

// Folds v (weight 1, and w into a second sum when kW) into (m, s[, sw]). A -inf adds nothing (and a
// class the teacher gives probability 0 adds nothing to the KL: 0 * log 0 = 0); a NaN sets the flag.
template <typename A, bool kW>
__device__ __forceinline__ void fold(A& m, A& s, A& sw, A v, A w, int& nan) {
  if (!(v > -dinf<A>())) {
    nan |= v != v;
    return;
  }
  if (v > m) {
    const A r = dexp(m - v);  // 0 while m is -inf
    s = s * r + A(1);
    if (kW) sw = vanish(sw, r) + w;
    m = v;
  } else {
    const A e = dexp(v - m);
    s += e;
    if (kW) sw += vanish(w, e);
  }
}

// Merges (m2, s2, sw2) into (m, s, sw); a pair with max -inf has sums 0.
template <typename A, bool kW>
__device__ __forceinline__ void merge_pair(A& m, A& s, A& sw, A m2, A s2, A sw2) {
  const A mn = m2 > m ? m2 : m;
  if (mn == -dinf<A>()) return;
  const A r1 = dexp(m - mn), r2 = dexp(m2 - mn);
  s = s * r1 + s2 * r2;
  if (kW) sw = vanish(sw, r1) + vanish(sw2, r2);
  m = mn;
}

template <typename A>
__device__ __forceinline__ void merge(Stats<A>& r, const Stats<A>& o) {
  A unused = A(0);
  merge_pair<A, false>(r.mz, r.sz, unused, o.mz, o.sz, A(0));
  merge_pair<A, false>(r.mb, r.sb, unused, o.mb, o.sb, A(0));
  merge_pair<A, true>(r.ma, r.sa, r.sd, o.ma, o.sa, o.sd);
  r.sx += o.sx;
  r.nan_z |= o.nan_z;
  r.nan_k |= o.nan_k;
}

// Merges the statistics of a group of G threads in a fixed order: G == 32 a warp (every lane gets
// the result), G > 32 the whole block (thread 0 gets it).
template <typename A, int G>
__device__ __forceinline__ void group_reduce(Stats<A>& r) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats<A> p;
    p.mz = __shfl_xor_sync(0xffffffffu, r.mz, o);
    p.sz = __shfl_xor_sync(0xffffffffu, r.sz, o);
    p.mb = __shfl_xor_sync(0xffffffffu, r.mb, o);
    p.sb = __shfl_xor_sync(0xffffffffu, r.sb, o);
    p.ma = __shfl_xor_sync(0xffffffffu, r.ma, o);
    p.sa = __shfl_xor_sync(0xffffffffu, r.sa, o);
    p.sd = __shfl_xor_sync(0xffffffffu, r.sd, o);
    p.sx = __shfl_xor_sync(0xffffffffu, r.sx, o);
    p.nan_z = __shfl_xor_sync(0xffffffffu, r.nan_z, o);
    p.nan_k = __shfl_xor_sync(0xffffffffu, r.nan_k, o);
    merge(r, p);
  }
  if constexpr (G > 32) {
    __shared__ Stats<A> warps[G / 32];
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) warps[warp] = r;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < G / 32; ++w) merge(r, warps[w]);
    }
  }
}

// Rows per block and the row of this thread's group.
template <int G>
__device__ __forceinline__ int64_t group_row() {
  return int64_t(blockIdx.x) * (kBlockThreads / G) + threadIdx.x / G;
}

template <typename scalar_t, int G>
__global__ __launch_bounds__(kBlockThreads) void distill_forward_kernel(const DistillDev d) {
  using A = acc_t<scalar_t>;
  const int lane = threadIdx.x % G;
  const int64_t i = group_row<G>();
  const bool active = i < d.rows;  // uniform within the group; inactive groups still join the reduction
  const double w_kd = side_weight(d.alpha, 0), w_ce = side_weight(d.alpha, 1);
  const int64_t y = active && w_ce != 0.0 ? d.y[i] : d.ignore;  // alpha = 0: labels are not read
  const bool ce = active && w_ce != 0.0 && y != d.ignore, kd = active && w_kd != 0.0;
  const bool smooth = d.eps != 0.0;
  const scalar_t* z = static_cast<const scalar_t*>(d.z) + (active ? i * d.z_stride : 0);
  const scalar_t* t = static_cast<const scalar_t*>(d.t) + (active ? i * d.t_stride : 0);
  const A inv = static_cast<A>(d.inv_t);

  Stats<A> st = init<A>();
  A unused = A(0);
  const int64_t cols = ce ? d.C : (kd ? d.K : 0);  // the columns this row reads
  for (int64_t j = lane; j < cols; j += G) {
    const A x = static_cast<A>(z[j]);
    if (ce) {
      fold<A, false>(st.mz, st.sz, unused, x, A(0), st.nan_z);
      if (smooth) st.sx += static_cast<double>(x);
    }
    if (kd && j < d.K) {
      const A tv = static_cast<A>(t[j]);
      fold<A, false>(st.mb, st.sb, unused, x * inv, A(0), st.nan_k);
      // (t - z) / T rather than a - b: logits with a large common offset keep their difference
      fold<A, true>(st.ma, st.sa, st.sd, tv * inv, (tv - x) * inv, st.nan_k);
    }
  }
  group_reduce<A, G>(st);
  if (!active || lane != 0) return;

  const A nan = dnan<A>();
  double lse_z = 0.0, lse_b = 0.0, lse_a = 0.0;
  A ce_loss = A(0), kl = A(0);
  if (ce) {
    if (st.nan_z || st.mz == dinf<A>() || st.mz == -dinf<A>() || y < 0 || y >= d.C) {
      lse_z = static_cast<double>(nan);  // a NaN logit, a non-finite max or a label out of range
      ce_loss = nan;
    } else {
      const A ls = dlog(st.sz);
      lse_z = static_cast<double>(st.mz) + static_cast<double>(ls);
      // (mz - z[y]) first: with logits near 1e4 a float lse is off by 5e-4
      const A nll = (st.mz - static_cast<A>(z[y])) + ls;
      const A eps = static_cast<A>(d.eps);
      ce_loss = smooth ? (A(1) - eps) * nll + eps * static_cast<A>(lse_z - st.sx / static_cast<double>(d.C)) : nll;
    }
  }
  if (kd) {
    if (st.nan_k || !(st.mb > -dinf<A>() && st.mb < dinf<A>()) || !(st.ma > -dinf<A>() && st.ma < dinf<A>())) {
      lse_b = lse_a = static_cast<double>(nan);
      kl = nan;
    } else {
      const A lb = dlog(st.sb), la = dlog(st.sa);
      lse_b = static_cast<double>(st.mb) + static_cast<double>(lb);
      lse_a = static_cast<double>(st.ma) + static_cast<double>(la);
      kl = st.sd / st.sa + static_cast<A>(lse_b - lse_a);
    }
  }
  d.stats[3 * i] = lse_z;
  d.stats[3 * i + 1] = lse_b;
  d.stats[3 * i + 2] = lse_a;
  if (d.row_ce) static_cast<A*>(d.row_ce)[i] = ce_loss;
  if (d.row_kl) static_cast<A*>(d.row_kl)[i] = kl;
  // a zero-weight term is not evaluated: its outputs are 0
  if (d.none_ce) {
    static_cast<A*>(d.none_ce)[i] = static_cast<A>(w_ce == 0.0 ? 0.0 : w_ce * static_cast<double>(ce_loss));
  }
  if (d.none_kd) {
    static_cast<A*>(d.none_kd)[i] = static_cast<A>(w_kd == 0.0 ? 0.0 : w_kd * d.t2 * static_cast<double>(kl));
  }
}

// One block: the sums of the row losses and the count of non-ignored rows, in a fixed order.
constexpr int kFinalizeThreads = 1024;

template <typename scalar_t>
__global__ __launch_bounds__(kFinalizeThreads) void distill_finalize_kernel(const DistillDev d,
                                                                             acc_t<scalar_t>* term_kd,
                                                                             acc_t<scalar_t>* term_ce,
                                                                             int64_t* count) {
  using A = acc_t<scalar_t>;
  __shared__ double dsm[32];
  __shared__ long long lsm[32];
  const double w_kd = side_weight(d.alpha, 0), w_ce = side_weight(d.alpha, 1);
  double sum_ce = 0.0, sum_kl = 0.0;
  long long cnt = 0;
  for (int64_t r = threadIdx.x; r < d.rows; r += blockDim.x) {
    if (w_ce != 0.0) cnt += d.y[r] != d.ignore;
    if (d.row_ce) sum_ce += static_cast<double>(static_cast<const A*>(d.row_ce)[r]);
    if (d.row_kl) sum_kl += static_cast<double>(static_cast<const A*>(d.row_kl)[r]);
  }
  sum_ce = block_sum(sum_ce, dsm);
  sum_kl = block_sum(sum_kl, dsm);
  cnt = block_sum(cnt, lsm);
  if (threadIdx.x != 0) return;
  *count = cnt;
  if (term_kd == nullptr) return;  // reduction none: the per-row outputs are already written
  const bool mean = d.reduction == kMean;
  *term_kd = static_cast<A>(w_kd == 0.0 ? 0.0 : w_kd * d.t2 * (mean ? sum_kl / static_cast<double>(d.rows) : sum_kl));
  *term_ce = static_cast<A>(w_ce == 0.0 ? 0.0 : w_ce * (mean ? sum_ce / static_cast<double>(cnt) : sum_ce));
}

template <typename A>
__device__ __forceinline__ double grad_output_at(const TermGrad& g, int64_t i) {
  if (g.rows) return static_cast<double>(static_cast<const A*>(g.rows)[i * g.stride]);
  return g.dev ? *g.dev : g.host;
}

template <typename scalar_t, int G>
__global__ __launch_bounds__(kBlockThreads) void distill_backward_kernel(const DistillDev d) {
  using A = acc_t<scalar_t>;
  const int lane = threadIdx.x % G;
  const int64_t i = group_row<G>();
  if (i >= d.rows) return;  // no group-wide collectives below
  const int64_t C = d.C, K = d.K;
  scalar_t* g = static_cast<scalar_t*>(d.grad) + i * C;
  const scalar_t* z = static_cast<const scalar_t*>(d.z) + i * d.z_stride;
  const scalar_t* t = static_cast<const scalar_t*>(d.t) + i * d.t_stride;
  const double w_kd = side_weight(d.alpha, 0), w_ce = side_weight(d.alpha, 1);
  const bool mean = d.reduction == kMean;
  const int64_t y = d.g_ce.on && w_ce != 0.0 ? d.y[i] : d.ignore;
  const bool ce = d.g_ce.on && w_ce != 0.0 && y != d.ignore, kd = d.g_kd.on && w_kd != 0.0;
  const double* lse = d.lse + 3 * i;
  // lse is NaN for rows the forward found non-finite or mislabelled; labels are re-checked in case
  // they changed in place since the forward
  const bool nan_row = (ce && (!(lse[0] > -1e308 && lse[0] < 1e308) || y < 0 || y >= C)) ||
                       (kd && !(lse[1] > -1e308 && lse[1] < 1e308 && lse[2] > -1e308 && lse[2] < 1e308));
  const A s_ce = ce ? static_cast<A>(grad_output_at<A>(d.g_ce, i) *
                                     (mean ? w_ce / static_cast<double>(*d.count) : w_ce))
                    : A(0);
  const A s_kd = kd ? static_cast<A>(grad_output_at<A>(d.g_kd, i) * w_kd * d.temperature /
                                     (mean ? static_cast<double>(d.rows) : 1.0))
                    : A(0);
  // x - lse as (x - hi) - lo: exact enough in fp32 even for logits near 1e4
  A hi[3], lo[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    hi[k] = static_cast<A>(lse[k]);
    lo[k] = static_cast<A>(lse[k] - static_cast<double>(hi[k]));
  }
  const A eps = static_cast<A>(d.eps), inv = static_cast<A>(d.inv_t);
  const A off = s_ce * eps / A(C), k1 = s_ce * (A(1) - eps);
  for (int64_t j = lane; j < C; j += G) {
    A v = A(0);
    if (nan_row) {
      v = dnan<A>();
    } else if (ce || (kd && j < K)) {
      // fp32 (fp64) all the way, rounded once: p_y - 1 must not be formed in bf16
      const A x = static_cast<A>(z[j]);
      if (ce) v = dexp((x - hi[0]) - lo[0]) * s_ce - off - (j == y ? k1 : A(0));
      if (kd && j < K) {
        const A tv = static_cast<A>(t[j]);
        v += (dexp((x * inv - hi[1]) - lo[1]) - dexp((tv * inv - hi[2]) - lo[2])) * s_kd;
      }
    }
    g[j] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kBackward>
void launch_rows(const DistillDev& d, cudaStream_t stream) {
  auto go = [&](auto g_c) {
    constexpr int G = decltype(g_c)::value;
    const int64_t blocks = (d.rows + kBlockThreads / G - 1) / (kBlockThreads / G);
    TORCH_CHECK(blocks < INT_MAX, "alpha_weighted_distillation: too many rows (", d.rows, ")");
    if constexpr (kBackward) {
      distill_backward_kernel<scalar_t, G><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(d);
    } else {
      distill_forward_kernel<scalar_t, G><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (d.C <= kWarpClasses) {
    go(std::integral_constant<int, 32>{});
  } else {
    go(std::integral_constant<int, kBlockThreads>{});
  }
}

// The call's device view; `keep` holds the tensors it points into alive until the launches are queued.
struct Prepared {
  DistillCall h;
  DistillDev d;
  Tensor alpha_keep;
};

Prepared prepare(const Tensor& logits, const Tensor& labels, const Tensor& teacher, const Tensor& alpha,
                 double temperature, int64_t ignore, double eps, int64_t reduction) {
  check_on_device({&logits, &labels, &teacher}, alpha);
  Prepared p;
  p.h = make_distill_call(logits, labels, teacher, temperature, reduction);
  DistillDev& d = p.d;
  d.z = p.h.student.logits.const_data_ptr();
  d.t = p.h.teacher.const_data_ptr();
  d.y = p.h.student.labels.const_data_ptr<int64_t>();
  d.rows = p.h.student.rows;
  d.C = p.h.student.classes;
  d.K = p.h.teacher_classes;
  d.z_stride = p.h.student.row_stride;
  d.t_stride = p.h.teacher_row_stride;
  d.ignore = ignore;
  d.temperature = temperature;
  d.inv_t = 1.0 / temperature;
  d.t2 = temperature * temperature;
  d.eps = eps;
  d.reduction = static_cast<int>(reduction);
  d.alpha = make_alpha_arg(alpha, p.alpha_keep);
  return p;
}

void launch_backward(const DistillDev& d, at::ScalarType dtype, cudaStream_t stream) {
  if (d.rows == 0 || d.C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "alpha_weighted_distillation_backward_cuda",
                                  [&] { launch_rows<scalar_t, true>(d, stream); });
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, Tensor> forward(const Tensor& logits, const Tensor& labels,
                                                                 const Tensor& teacher, const Tensor& alpha,
                                                                 double temperature, int64_t ignore, double eps,
                                                                 int64_t reduction, bool write_grad) {
  c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Prepared p = prepare(logits, labels, teacher, alpha, temperature, ignore, eps, reduction);
  DistillDev& d = p.d;
  const auto opts = logits.options();
  const auto acc = at::toOpMathType(logits.scalar_type());
  Tensor stats = at::empty({d.rows, 3}, opts.dtype(at::kDouble));
  Tensor count = at::empty({1}, opts.dtype(at::kLong));
  Tensor term_kd, term_ce, row_ce, row_kl;
  d.stats = stats.mutable_data_ptr<double>();
  if (reduction == kNone) {
    term_kd = at::empty(p.h.student.label_sizes, opts.dtype(acc));
    term_ce = at::empty(p.h.student.label_sizes, opts.dtype(acc));
    d.none_kd = term_kd.mutable_data_ptr();
    d.none_ce = term_ce.mutable_data_ptr();
  } else {
    term_kd = at::empty({}, opts.dtype(acc));
    term_ce = at::empty({}, opts.dtype(acc));
    row_ce = at::empty({d.rows}, opts.dtype(acc));
    row_kl = at::empty({d.rows}, opts.dtype(acc));
    d.row_ce = row_ce.mutable_data_ptr();
    d.row_kl = row_kl.mutable_data_ptr();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "alpha_weighted_distillation_cuda",
                                  [&] {
    using A = acc_t<scalar_t>;
    if (d.rows > 0 && d.C > 0) launch_rows<scalar_t, false>(d, stream);
    // also for 0 rows: the count, and the means' NaN (0 / 0), as F gives
    distill_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
        d, reduction == kNone ? nullptr : term_kd.mutable_data_ptr<A>(),
        reduction == kNone ? nullptr : term_ce.mutable_data_ptr<A>(), count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  Tensor grad = at::empty({0}, opts);
  if (write_grad) {  // the backward kernel with unit grad_outputs
    grad = at::empty(p.h.student.logits_sizes, opts);
    d.grad = grad.mutable_data_ptr();
    d.lse = stats.const_data_ptr<double>();
    d.count = count.const_data_ptr<int64_t>();
    d.g_kd.on = d.g_ce.on = true;
    launch_backward(d, logits.scalar_type(), stream);
  }
  return {term_kd, term_ce, {stats, count}, grad};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& logits, const Tensor& labels, const Tensor& teacher,
                                          const Tensor& alpha, double temperature, int64_t ignore, double eps,
                                          int64_t reduction) {
  auto out = forward(logits, labels, teacher, alpha, temperature, ignore, eps, reduction, false);
  return {std::get<0>(out), std::get<1>(out)};
}

// A term's grad_output as the backward kernel reads it; `keep` holds a converted copy alive.
TermGrad term_grad(const std::optional<Tensor>& go, int64_t rows, int64_t reduction, const Tensor& like,
                   Tensor& keep) {
  TermGrad g;
  if (!go.has_value() || !go->defined()) return g;
  g.on = true;
  if (reduction == kNone) {
    TORCH_CHECK(go->numel() == rows, "grad_output of a per-row loss must have one element per row");
    // in the accumulation type; an expanded float grad_output (stride 0) stays a view
    keep = go->to(like.device(), at::toOpMathType(like.scalar_type())).reshape({rows});
    g.rows = keep.const_data_ptr();
    g.stride = rows > 1 ? keep.stride(0) : 0;
  } else {
    TORCH_CHECK(go->numel() == 1, "grad_output of a reduced loss must have one element");
    if (go->is_cpu()) {
      g.host = go->item<double>();  // host memory: no device sync
    } else {
      keep = go->reshape({}).to(at::kDouble).contiguous();
      g.dev = keep.const_data_ptr<double>();
    }
  }
  return g;
}

Tensor backward(const std::optional<Tensor>& g_kd, const std::optional<Tensor>& g_ce, const Tensor& logits,
                const Tensor& labels, const Tensor& teacher, const Tensor& alpha, at::TensorList saved,
                double temperature, int64_t ignore, double eps, int64_t reduction) {
  c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Prepared p = prepare(logits, labels, teacher, alpha, temperature, ignore, eps, reduction);
  DistillDev& d = p.d;
  TORCH_CHECK(saved.size() == 2 && saved[0].numel() == 3 * d.rows && saved[1].numel() == 1,
              "saved must be the forward's {stats, count}");
  const Tensor stats = saved[0].to(logits.device(), at::kDouble).contiguous();
  const Tensor count = saved[1].to(logits.device(), at::kLong).contiguous();
  Tensor keep_kd, keep_ce;
  d.g_kd = term_grad(g_kd, d.rows, reduction, logits, keep_kd);
  d.g_ce = term_grad(g_ce, d.rows, reduction, logits, keep_ce);
  if (!d.g_kd.on && !d.g_ce.on) return at::zeros(p.h.student.logits_sizes, logits.options());
  d.lse = stats.const_data_ptr<double>();
  d.count = count.const_data_ptr<int64_t>();
  Tensor grad = at::empty(p.h.student.logits_sizes, logits.options());
  d.grad = grad.mutable_data_ptr();
  launch_backward(d, logits.scalar_type(), stream);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  FASTADAPT_IMPL(m, alpha_weighted_distillation, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_distillation_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_distillation_backward, backward);
}

}  // namespace fastadapt::cuda
