// CUDA kernels of the alpha-weighted cross-entropy:
//   loss = alpha * CE(target_logits, target_labels) + (1 - alpha) * CE(source_logits, source_labels)
//
// Design for bytes: 2 reads + 1 write of the logits for forward + backward, nothing else of size N*C.
//   forward:  one pass over each row (online softmax: running max and rescaled sum, plus sum(x) for
//             label smoothing) -> per-row lse (float64) and loss; reads N*C*sizeof(T), writes O(N).
//   finalize: one block sums the per-row losses and counts non-ignored rows in a fixed order (no float
//             atomics, so results are bitwise reproducible) and writes the weighted loss and counts.
//   backward: re-reads each row once, writes grad = s*(exp(x - lse) - eps/C) - s*(1-eps)*onehot(y)
//             once; reads N*C*sizeof(T), writes N*C*sizeof(T). The gradient is not computed in the
//             forward (unlike the CPU kernel): on a GPU it would cost an extra N*C write that the
//             backward then overwrites, and the logits re-read is at HBM speed.
// Rows of both sides share one launch. A row is handled by 4 threads (C <= 8 vectors), a warp
// (C <= 512 vectors) or a 512-thread block; 16-byte vector loads/stores after a scalar head that
// brings the row pointer to 16-byte alignment, so any row stride works. All offsets are int64.
//
// Nothing here synchronises with the host: counts, the scalar grad_output and a device alpha are
// read by the kernels. Hence the two device-side conventions:
//   * a label outside [0, C) that is not ignore_index cannot raise without a host sync (and a device
//     assert would kill the CUDA context), so that row's loss and lse become NaN: the reduced loss is
//     NaN and the row's gradient is NaN. (The CPU kernel raises instead.)
//   * a device-resident alpha outside [0, 1] (or NaN) makes every output NaN (see side_weight).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <type_traits>

#include "cuda/common.cuh"
#include "loss_common.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;

struct CeSideDev {
  const void* logits = nullptr;   // (rows, classes), class stride 1, row stride row_stride
  const int64_t* labels = nullptr;  // (rows,)
  int64_t rows = 0, classes = 0, row_stride = 0;
  void* lse = nullptr;       // double (rows,): see csrc/cpu/loss_rows.h for why not acc_t
  void* out_none = nullptr;  // scalar_t (rows,): weighted per-row loss (reduction none) or null
  void* grad = nullptr;      // scalar_t (rows, classes) contiguous, or null (not computed)
  const void* g_rows = nullptr;  // scalar_t per-row grad_output (reduction none) or null
  int64_t g_stride = 0;
  const double* g_dev = nullptr;  // scalar grad_output on the device, else g_host
  double g_host = 1.0;
};

struct CeArgs {
  CeSideDev s[2];
  int64_t row_begin = 0, row_end = 0;  // global rows: source rows, then target rows
  AlphaArg alpha;
  int64_t ignore = -100;
  double eps = 0.0;
  int reduction = kMean;
  void* row_loss = nullptr;         // acc_t (N_s + N_t,) unweighted losses, by global row, or null
  const int64_t* counts = nullptr;  // (2,) on the device (backward)
};

template <typename A>
__device__ __forceinline__ A amax(A a, A b) {
  return b > a ? b : a;  // a NaN b is ignored, so a running max never becomes NaN
}

// Merges two (max, sum of exp(x - max)) pairs. A pair with max -inf has sum 0.
template <typename A>
__device__ __forceinline__ void ms_merge(A& m, A& s, A m2, A s2) {
  const A mn = amax(m, m2);
  if (mn == -dinf<A>()) {
    s = A(0);
  } else {
    s = s * dexp(m - mn) + s2 * dexp(m2 - mn);
  }
  m = mn;
}

// Sum/merge across a group of G threads. G <= 32: the group is an aligned slice of a warp and every
// lane of the warp executes this. G > 32: the group is the whole block; the result is in thread 0.
template <typename A, int G>
__device__ __forceinline__ void group_reduce(A& m, A& s, A& sx) {
  constexpr int W = G < 32 ? G : 32;
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, o);
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    ms_merge(m, s, m2, s2);
  }
  if constexpr (G > 32) {
    constexpr int NW = G / 32;
    __shared__ A sm[NW], ss[NW], sxs[NW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
      sxs[warp] = sx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      m = sm[0];
      s = ss[0];
      sx = sxs[0];
      for (int w = 1; w < NW; ++w) {  // fixed order: deterministic
        ms_merge(m, s, sm[w], ss[w]);
        sx += sxs[w];
      }
    }
  }
}

// Folds n values into a thread's running (max m, sum of exp(x - m), sum of x). A NaN logit never
// enters m (amax ignores it) but makes sx NaN, which marks the row as NaN at the end.
template <typename A, int N>
__device__ __forceinline__ void online_chunk(const A* xs, A& m, A& s, A& sx) {
  A cm = -dinf<A>();
#pragma unroll
  for (int k = 0; k < N; ++k) cm = amax(cm, xs[k]);
  if (cm > m) {
    s *= dexp(m - cm);
    m = cm;
  }
  if (m != -dinf<A>()) {  // all -inf so far: nothing to add (and exp(-inf - -inf) would be NaN)
#pragma unroll
    for (int k = 0; k < N; ++k) s += dexp(xs[k] - m);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) sx += xs[k];
}

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// Number of leading elements before p + head is 16-byte aligned (p is element-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t n) {
  const int64_t h = int64_t((kVecBytes - (reinterpret_cast<uintptr_t>(p) % kVecBytes)) % kVecBytes) / int64_t(sizeof(T));
  return h < n ? h : n;
}

__device__ __forceinline__ int side_of(const CeArgs& p, int64_t row, int64_t& i) {
  const bool t = row >= p.s[0].rows;
  i = t ? row - p.s[0].rows : row;
  return t ? 1 : 0;
}

template <typename scalar_t, int G, int BLOCK>
__global__ __launch_bounds__(BLOCK) void ce_forward_kernel(const CeArgs p) {
  using A = acc_t<scalar_t>;
  constexpr int VN = Vec<scalar_t>::N;
  constexpr int RPB = BLOCK / G;
  constexpr int U = 4;
  const int lane = threadIdx.x % G;
  const int64_t row = p.row_begin + int64_t(blockIdx.x) * RPB + threadIdx.x / G;
  const bool active = row < p.row_end;
  int64_t i = 0;
  const int sd = active ? side_of(p, row, i) : 0;
  const CeSideDev& d = sd ? p.s[1] : p.s[0];
  const double w = side_weight(p.alpha, sd);
  const int64_t y = active ? d.labels[i] : 0;
  const bool skip = !active || w == 0.0 || y == p.ignore;  // uniform within the group
  const int64_t C = d.classes;
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;

  A m = -dinf<A>(), s = A(0), sx = A(0);
  auto vchunk = [&](const Vec<scalar_t>& r) {
    A xs[VN];
#pragma unroll
    for (int k = 0; k < VN; ++k) xs[k] = static_cast<A>(r.v[k]);
    online_chunk<A, VN>(xs, m, s, sx);
  };

  if (!skip) {
    const int64_t head = head_elems(x, C);
    const int64_t nvec = (C - head) / VN;
    const int64_t body_end = head + nvec * VN;
    const scalar_t* xb = x + head;
    int64_t v = lane;
    for (; v + (U - 1) * G < nvec; v += U * G) {
      Vec<scalar_t> r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = load_vec(xb + (v + u * G) * VN);
#pragma unroll
      for (int u = 0; u < U; ++u) vchunk(r[u]);
    }
    for (; v < nvec; v += G) vchunk(load_vec(xb + v * VN));
    const int64_t nscalar = head + (C - body_end);
    for (int64_t k = lane; k < nscalar; k += G) {
      const int64_t c = k < head ? k : body_end + (k - head);
      const A xs[1] = {static_cast<A>(x[c])};
      online_chunk<A, 1>(xs, m, s, sx);
    }
  }
  group_reduce<A, G>(m, s, sx);

  if (!active || lane != 0) return;
  double lse;
  A loss;
  if (skip) {
    lse = 0.0;
    loss = A(0);
  } else if (m == dinf<A>() || m == -dinf<A>() || sx != sx || y < 0 || y >= C) {
    // non-finite max, a NaN logit, or an out-of-range label: NaN as in ATen (label: see header)
    lse = static_cast<double>(dnan<A>());
    loss = dnan<A>();
  } else {
    // lse in double and (m - x[y]) first: with logits near 1e4 a float lse is off by 5e-4
    const A ls = dlog(s);
    lse = static_cast<double>(m) + static_cast<double>(ls);
    const A eps = static_cast<A>(p.eps);
    const A xy = static_cast<A>(x[y]);
    loss = (m - xy) + ls;
    if (eps != A(0)) loss += eps * (xy - sx / A(C));
  }
  static_cast<double*>(d.lse)[i] = lse;
  if (p.row_loss) static_cast<A*>(p.row_loss)[row] = loss;
  if (d.out_none) {
    // a zero-weight side is not evaluated: its outputs are 0 even where the loss would be NaN
    static_cast<scalar_t*>(d.out_none)[i] =
        static_cast<scalar_t>(static_cast<A>(w == 0.0 ? 0.0 : w * static_cast<double>(loss)));
  }
}

template <typename scalar_t, int G, int BLOCK>
__global__ __launch_bounds__(BLOCK) void ce_backward_kernel(const CeArgs p) {
  using A = acc_t<scalar_t>;
  constexpr int VN = Vec<scalar_t>::N;
  constexpr int RPB = BLOCK / G;
  constexpr int U = 4;
  const int lane = threadIdx.x % G;
  const int64_t row = p.row_begin + int64_t(blockIdx.x) * RPB + threadIdx.x / G;
  if (row >= p.row_end) return;  // no group-wide collectives below
  int64_t i = 0;
  const int sd = side_of(p, row, i);
  const CeSideDev& d = sd ? p.s[1] : p.s[0];
  if (d.grad == nullptr) return;
  const int64_t C = d.classes;
  scalar_t* g = static_cast<scalar_t*>(d.grad) + i * C;
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;
  const double w = side_weight(p.alpha, sd);
  const int64_t y = d.labels[i];

  constexpr int kZero = 0, kNaN = 1, kGrad = 2;
  int mode = kGrad;
  A lse_hi = A(0), lse_lo = A(0), scale = A(0);
  if (w == 0.0 || y == p.ignore) {
    mode = kZero;
  } else {
    double gv;
    if (d.g_rows) {
      gv = static_cast<double>(static_cast<A>(static_cast<const scalar_t*>(d.g_rows)[i * d.g_stride]));
    } else {
      gv = d.g_dev ? *d.g_dev : d.g_host;
    }
    const double sc = p.reduction == kNone ? gv * w
                                           : gv * (p.reduction == kMean ? w / static_cast<double>(p.counts[sd]) : w);
    scale = static_cast<A>(sc);
    const double lse = static_cast<const double*>(d.lse)[i];
    // x - lse as (x - hi) - lo: exact enough in fp32 even for logits near 1e4
    lse_hi = static_cast<A>(lse);
    lse_lo = static_cast<A>(lse - static_cast<double>(lse_hi));
    // lse is NaN for rows the forward found non-finite or mislabelled; labels are re-checked in
    // case they changed in place since the forward
    if (!(lse > -1e308 && lse < 1e308) || y < 0 || y >= C) mode = kNaN;
  }
  const A eps = static_cast<A>(p.eps);
  const A off = scale * eps / A(C);
  const A k1 = scale * (A(1) - eps);
  // fp32 (fp64) all the way, rounded once: p_y - 1 must not be formed in bf16
  auto elem = [&](A xv, int64_t c) -> A {
    if (mode == kZero) return A(0);
    if (mode == kNaN) return dnan<A>();
    A e = dexp((xv - lse_hi) - lse_lo) * scale - off;
    if (c == y) e -= k1;
    return e;
  };

  const int64_t head = head_elems(g, C);
  // vector path when the logits row and the gradient row share their misalignment (always true for
  // contiguous 16-byte-aligned logits); zero/NaN rows do not read x at all.
  const bool vec = mode != kGrad || head == head_elems(x, C);
  const int64_t nvec = vec ? (C - head) / VN : 0;
  const int64_t vbegin = vec ? head : 0;
  const int64_t body_end = vbegin + nvec * VN;
  int64_t v = lane;
  if (mode == kGrad) {
    for (; v + (U - 1) * G < nvec; v += U * G) {
      Vec<scalar_t> r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = load_vec(x + vbegin + (v + u * G) * VN);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c0 = vbegin + (v + u * G) * VN;
        Vec<scalar_t> o;
#pragma unroll
        for (int k = 0; k < VN; ++k) o.v[k] = static_cast<scalar_t>(elem(static_cast<A>(r[u].v[k]), c0 + k));
        store_vec(g + c0, o);
      }
    }
  }
  for (; v < nvec; v += G) {
    const int64_t c0 = vbegin + v * VN;
    Vec<scalar_t> o;
    if (mode == kGrad) {
      const Vec<scalar_t> r = load_vec(x + c0);
#pragma unroll
      for (int k = 0; k < VN; ++k) o.v[k] = static_cast<scalar_t>(elem(static_cast<A>(r.v[k]), c0 + k));
    } else {
#pragma unroll
      for (int k = 0; k < VN; ++k) o.v[k] = static_cast<scalar_t>(elem(A(0), c0 + k));
    }
    store_vec(g + c0, o);
  }
  const int64_t nscalar = vbegin + (C - body_end);
  for (int64_t k = lane; k < nscalar; k += G) {
    const int64_t c = k < vbegin ? k : body_end + (k - vbegin);
    const A xv = mode == kGrad ? static_cast<A>(x[c]) : A(0);
    g[c] = static_cast<scalar_t>(elem(xv, c));
  }
}

// One block: per-side sums of the row losses and counts of non-ignored rows, in a fixed order.
constexpr int kFinalizeThreads = 1024;

template <typename scalar_t>
__global__ __launch_bounds__(kFinalizeThreads) void ce_finalize_kernel(const CeArgs p, scalar_t* out0,
                                                                        int64_t* counts) {
  using A = acc_t<scalar_t>;
  __shared__ double dsm[32];
  __shared__ long long lsm[32];
  double total = 0.0;
  for (int sd = 0; sd < 2; ++sd) {
    const CeSideDev& d = p.s[sd];
    const int64_t base = sd == 0 ? 0 : p.s[0].rows;
    const double w = side_weight(p.alpha, sd);
    long long cnt = 0;
    if (w != 0.0) {  // uniform across the block; a zero-weight term is not evaluated
      double sum = 0.0;
      for (int64_t r = threadIdx.x; r < d.rows; r += blockDim.x) {
        cnt += d.labels[r] != p.ignore;
        if (p.row_loss) sum += static_cast<double>(static_cast<const A*>(p.row_loss)[base + r]);
      }
      sum = block_sum(sum, dsm);
      cnt = block_sum(cnt, lsm);
      total += p.reduction == kMean ? w * (sum / static_cast<double>(cnt)) : w * sum;
    }
    if (threadIdx.x == 0) counts[sd] = cnt;
  }
  if (threadIdx.x == 0 && out0) *out0 = static_cast<scalar_t>(total);
}

template <typename scalar_t, bool kBackward>
void launch_rows(const CeArgs& p, int64_t max_classes, cudaStream_t stream) {
  const int64_t nrows = p.row_end - p.row_begin;
  if (nrows <= 0 || max_classes <= 0) return;
  constexpr int VN = Vec<scalar_t>::N;
  const int64_t nvec = (max_classes + VN - 1) / VN;
  auto go = [&](auto g_c, auto b_c) {
    constexpr int G = decltype(g_c)::value, B = decltype(b_c)::value;
    constexpr int RPB = B / G;
    const int64_t blocks = (nrows + RPB - 1) / RPB;
    TORCH_CHECK(blocks < INT_MAX, "alpha_weighted_cross_entropy: too many rows (", nrows, ")");
    if constexpr (kBackward) {
      ce_backward_kernel<scalar_t, G, B><<<static_cast<unsigned>(blocks), B, 0, stream>>>(p);
    } else {
      ce_forward_kernel<scalar_t, G, B><<<static_cast<unsigned>(blocks), B, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (nvec <= 8) {
    go(std::integral_constant<int, 4>{}, std::integral_constant<int, 256>{});
  } else if (nvec <= 512) {
    go(std::integral_constant<int, 32>{}, std::integral_constant<int, 256>{});
  } else {
    go(std::integral_constant<int, 512>{}, std::integral_constant<int, 512>{});
  }
}

// Host view of one side: (rows, classes) with class stride 1 (a copy only when that needs one) and
// int64 contiguous labels.
struct HostSide {
  Tensor logits, labels;
  std::vector<int64_t> logits_sizes, label_sizes;
  int64_t rows = 0, classes = 0, row_stride = 0;
};

HostSide make_side(const Tensor& logits, const Tensor& labels) {
  HostSide h;
  h.classes = logits.size(-1);
  h.rows = labels.numel();
  h.logits_sizes = logits.sizes().vec();
  h.label_sizes = labels.sizes().vec();
  Tensor l2 = logits.reshape({h.rows, h.classes});
  if (h.rows > 0 && h.classes > 0 && (l2.stride(1) != 1 || (h.rows > 1 && l2.stride(0) < h.classes))) {
    l2 = l2.contiguous();
  }
  h.logits = l2;
  h.row_stride = h.rows > 1 ? l2.stride(0) : h.classes;
  h.labels = labels.reshape({h.rows}).to(at::kLong).contiguous();
  return h;
}

void fill_side(CeSideDev& d, const HostSide& h) {
  d.logits = h.logits.const_data_ptr();
  d.labels = h.labels.const_data_ptr<int64_t>();
  d.rows = h.rows;
  d.classes = h.classes;
  d.row_stride = h.row_stride;
}

void check_device(const Tensor& sl, const Tensor& alpha) {
  TORCH_CHECK(sl.is_cuda(), "fastadapt CUDA kernel called with ", sl.device(), " tensors");
  (void)alpha;
}

void launch_backward(CeArgs& p, at::ScalarType dtype, cudaStream_t stream) {
  const bool need_s = p.s[0].grad != nullptr && p.s[0].rows > 0;
  const bool need_t = p.s[1].grad != nullptr && p.s[1].rows > 0;
  if (!need_s && !need_t) return;
  p.row_begin = need_s ? 0 : p.s[0].rows;
  p.row_end = need_t ? p.s[0].rows + p.s[1].rows : p.s[0].rows;
  const int64_t max_c = std::max(need_s ? p.s[0].classes : 0, need_t ? p.s[1].classes : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "alpha_weighted_cross_entropy_backward_cuda",
                                  [&] { launch_rows<scalar_t, true>(p, max_c, stream); });
}

// What forward and backward both need: checked arguments, the flattened sides, and the kernel
// parameters that do not depend on the pass. Keeps the tensors the parameters point into alive.
struct CeCall {
  Tensor alpha_keep;
  std::array<HostSide, 2> h;
  CeArgs p;
};

CeCall prepare_call(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                    int64_t ignore, double eps, int64_t reduction) {
  check_cross_entropy_args(sl, sy, tl, ty, alpha, eps, reduction);
  check_device(sl, alpha);
  CeCall c{Tensor(), {make_side(sl, sy), make_side(tl, ty)}, CeArgs()};
  TORCH_CHECK(c.h[0].classes <= INT_MAX && c.h[1].classes <= INT_MAX, "too many classes");
  c.p.alpha = make_alpha_arg(alpha, c.alpha_keep);
  c.p.ignore = ignore;
  c.p.eps = eps;
  c.p.reduction = static_cast<int>(reduction);
  return c;
}

using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardOut forward(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                   int64_t ignore, double eps, int64_t reduction, std::array<bool, 2> write_grad) {
  c10::cuda::CUDAGuard device_guard(sl.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CeCall call = prepare_call(sl, sy, tl, ty, alpha, ignore, eps, reduction);
  CeArgs& p = call.p;
  const std::array<HostSide, 2>& h = call.h;
  const auto opts = sl.options();
  const auto acc = acc_type_for(sl.scalar_type());
  std::array<Tensor, 2> lse = {at::empty({h[0].rows}, opts.dtype(at::kDouble)),
                               at::empty({h[1].rows}, opts.dtype(at::kDouble))};
  Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  Tensor out0, out1, row_loss;
  if (reduction == kNone) {
    out0 = at::empty(h[0].label_sizes, opts);
    out1 = at::empty(h[1].label_sizes, opts);
  } else {
    out0 = at::empty({}, opts);
    out1 = empty_marker(sl);
    row_loss = at::empty({h[0].rows + h[1].rows}, opts.dtype(acc));
    p.row_loss = row_loss.mutable_data_ptr();
  }
  for (int k = 0; k < 2; ++k) {
    fill_side(p.s[k], h[k]);
    p.s[k].lse = lse[k].mutable_data_ptr();
    if (reduction == kNone) p.s[k].out_none = (k == 0 ? out0 : out1).mutable_data_ptr();
  }
  p.row_begin = 0;
  p.row_end = h[0].rows + h[1].rows;
  const int64_t max_c = std::max(h[0].classes, h[1].classes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_cuda", [&] {
    launch_rows<scalar_t, false>(p, max_c, stream);
    ce_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
        p, reduction == kNone ? nullptr : out0.mutable_data_ptr<scalar_t>(), counts.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Gradient for a unit grad_output, on request: the backward kernel with g = 1.
  std::array<Tensor, 2> grads;
  for (int k = 0; k < 2; ++k) {
    if (!write_grad[k]) {
      grads[k] = at::empty({0}, opts);
    } else if (host_weight_is_zero(p.alpha, k)) {
      grads[k] = at::zeros(h[k].logits_sizes, opts);
    } else {
      grads[k] = at::empty(h[k].logits_sizes, opts);
      p.s[k].grad = grads[k].mutable_data_ptr();
      p.s[k].g_host = 1.0;
    }
  }
  p.counts = counts.const_data_ptr<int64_t>();
  launch_backward(p, sl.scalar_type(), stream);
  return {out0, out1, lse[0], lse[1], counts, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                          const Tensor& alpha, int64_t ignore, double eps, int64_t reduction) {
  auto out = forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<Tensor, Tensor> backward(const std::optional<Tensor>& g0, const std::optional<Tensor>& g1,
                                    const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                    const Tensor& alpha, const Tensor& lse_s, const Tensor& lse_t, const Tensor& counts,
                                    int64_t ignore, double eps, int64_t reduction, std::array<bool, 2> mask) {
  c10::cuda::CUDAGuard device_guard(sl.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CeCall call = prepare_call(sl, sy, tl, ty, alpha, ignore, eps, reduction);
  CeArgs& p = call.p;
  const std::array<HostSide, 2>& h = call.h;
  const auto opts = sl.options();
  TORCH_CHECK(lse_s.scalar_type() == at::kDouble && lse_t.scalar_type() == at::kDouble && lse_s.numel() == h[0].rows &&
                  lse_t.numel() == h[1].rows,
              "_alpha_weighted_cross_entropy_backward: lse tensors do not match the logits");
  TORCH_CHECK(counts.numel() == 2 && counts.scalar_type() == at::kLong,
              "_alpha_weighted_cross_entropy_backward: counts must be an int64 tensor of 2 elements");
  const std::array<Tensor, 2> lse = {lse_s.to(sl.device()).contiguous(), lse_t.to(sl.device()).contiguous()};
  const Tensor cnt = counts.to(sl.device()).contiguous();
  p.counts = cnt.const_data_ptr<int64_t>();

  const std::array<const std::optional<Tensor>*, 2> gout = {&g0, &g1};
  std::array<Tensor, 2> grads, keep;
  for (int k = 0; k < 2; ++k) {
    fill_side(p.s[k], h[k]);
    p.s[k].lse = const_cast<void*>(lse[k].const_data_ptr());
    const std::optional<Tensor>& go = reduction == kNone ? *gout[k] : g0;
    if (!mask[k]) {
      grads[k] = at::empty({0}, opts);
      continue;
    }
    if (host_weight_is_zero(p.alpha, k) || !go.has_value() || !go->defined()) {
      grads[k] = at::zeros(h[k].logits_sizes, opts);
      continue;
    }
    grads[k] = at::empty(h[k].logits_sizes, opts);
    p.s[k].grad = grads[k].mutable_data_ptr();
    if (reduction == kNone) {
      TORCH_CHECK_VALUE(go->numel() == h[k].rows, "grad_output for the ", k == 0 ? "source" : "target",
                        " losses has ", go->numel(), " elements, expected ", h[k].rows);
      // a view when possible: an expanded grad_output (stride 0) is read without materialising it
      keep[k] = go->to(sl.device(), sl.scalar_type()).reshape({h[k].rows});
      p.s[k].g_rows = keep[k].const_data_ptr();
      p.s[k].g_stride = h[k].rows > 1 ? keep[k].stride(0) : 0;
    } else {
      TORCH_CHECK_VALUE(go->numel() == 1, "grad_output of a reduced loss must have 1 element, got ", go->numel());
      if (go->is_cpu()) {
        p.s[k].g_host = go->item<double>();  // host memory: no device sync
      } else {
        keep[k] = go->reshape({}).to(at::kDouble).contiguous();
        p.s[k].g_dev = keep[k].const_data_ptr<double>();
      }
    }
  }
  launch_backward(p, sl.scalar_type(), stream);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("alpha_weighted_cross_entropy", &forward_public);
  m.impl("_alpha_weighted_cross_entropy_forward", &forward);
  m.impl("_alpha_weighted_cross_entropy_backward", &backward);
}

}  // namespace fastadapt::cuda
