// CUDA kernels of the alpha-weighted cross-entropy:
//   loss = alpha * CE(target_logits, target_labels) + (1 - alpha) * CE(source_logits, source_labels)
//
// Design for bytes: 2 reads + 1 write of the logits for forward + backward, nothing else of size N*C.
//   forward:  one pass over each row (online softmax: running max and rescaled sum; sum(x) only for
//             label smoothing; a NaN flag) -> per-row lse (float64) and loss; reads N*C*sizeof(T),
//             writes O(N).
//   finalize: one block sums the per-row losses and the divisors of the mean in a fixed order (no float
//             atomics, so results are bitwise reproducible) and writes each side's weighted term.
//   backward: re-reads each row once, writes grad = s*(exp(x - lse) - eps/C) - s*(1-eps)*onehot(y)
//             once; reads N*C*sizeof(T), writes N*C*sizeof(T). The autograd node does not ask the
//             forward for the gradient on a GPU: it would cost an N*C write that the backward then
//             overwrites, and re-reading the logits runs at HBM speed.
// Each side has its own launch, with a row handled by 4 threads (C <= 8 vectors), a warp (C <= 512
// vectors) or a 512-thread block, chosen from that side's C. 16-byte vector loads and stores after a
// scalar head that brings the row pointer to 16-byte alignment, so any row stride works; all offsets
// are int64. A side with class weights or probability targets takes simpler kernels instead
// (ce_weighted_*: a warp per row, element by element).
//
// Nothing here synchronises with the host: the divisors of the mean, the scalar grad_output and a
// device alpha are read by the kernels. Hence two device-side conventions:
//   * a label outside [0, C) that is not ignore_index cannot raise without a host sync (and a device
//     assert would kill the CUDA context), so that row's loss and lse become NaN: the reduced loss is
//     NaN and the row's gradient is NaN (with class weights the mean's divisor is NaN too: the label
//     has no weight). (The CPU kernel raises instead.)
//   * a device-resident alpha outside [0, 1] (or NaN) makes every output NaN (see side_weight).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <optional>
#include <type_traits>
#include <utility>

#include "alpha_weighted_cross_entropy.h"
#include "cuda/common.cuh"
#include "register.h"

namespace fastadapt::cuda {
namespace {

using at::Tensor;

// One side as the kernels read and write it.
struct CeSideDev {
  const void* logits = nullptr;     // (rows, classes), class stride 1, row stride row_stride
  const int64_t* labels = nullptr;  // (rows,) class indices, or null with probability targets
  const void* targets = nullptr;    // scalar_t (rows, classes) contiguous probability targets, or null
  const void* class_weight = nullptr;  // acc_t (classes,), or null
  bool weighted = false;            // class weights or probability targets: the ce_weighted_* kernels
  int64_t rows = 0, classes = 0, row_stride = 0;
  double* lse = nullptr;          // (rows,): see csrc/cpu/row_kernels.h for why not acc_t
  void* row_loss = nullptr;       // acc_t (rows,) unweighted losses (reduction mean/sum), or null
  void* out_none = nullptr;       // acc_t (rows,) weighted per-row losses (reduction none), or null
  void* grad = nullptr;           // scalar_t (rows, classes) contiguous, or null (not computed)
  const void* g_rows = nullptr;   // acc_t per-row grad_output (reduction none), or null
  int64_t g_stride = 0;
  const double* g_dev = nullptr;  // scalar grad_output on the device, else g_host
  double g_host = 1.0;
};

// What both sides share.
struct CeCommon {
  AlphaArg alpha;
  int64_t ignore = -100;
  double eps = 0.0;
  int reduction = kMean;
  const double* denom = nullptr;  // (2,) on the device: the divisors of reduction mean (backward)
};

template <typename A>
__device__ __forceinline__ A amax(A a, A b) {
  return b > a ? b : a;  // a NaN b is ignored: NaN is tracked by its own flag
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

// A thread's running row statistics: max m, sum of exp(x - m), sum of x (label smoothing only, in
// double: a finite row's logits near 1e38 must not overflow it, and a large common offset must not
// swallow their differences), and whether a NaN was seen. NaN gets a flag rather than riding on a
// sum, so a finite row never reads as NaN.
template <typename A>
struct RowStats {
  A m = -dinf<A>(), s = A(0);
  double sx = 0.0;
  int nan = 0;
};

// Merges the statistics across a group of G threads. G <= 32: the group is an aligned slice of a warp
// and every lane of the warp executes this. G > 32: the group is the whole block; the result is in
// thread 0.
template <typename A, int G>
__device__ __forceinline__ void group_reduce(RowStats<A>& r) {
  constexpr int W = G < 32 ? G : 32;
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, r.m, o);
    const A s2 = __shfl_xor_sync(0xffffffffu, r.s, o);
    r.sx += __shfl_xor_sync(0xffffffffu, r.sx, o);
    r.nan |= __shfl_xor_sync(0xffffffffu, r.nan, o);
    ms_merge(r.m, r.s, m2, s2);
  }
  if constexpr (G > 32) {
    constexpr int NW = G / 32;
    __shared__ A sm[NW], ss[NW];
    __shared__ double sxs[NW];
    __shared__ int snan[NW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
      sm[warp] = r.m;
      ss[warp] = r.s;
      sxs[warp] = r.sx;
      snan[warp] = r.nan;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < NW; ++w) {  // fixed order: deterministic
        ms_merge(r.m, r.s, sm[w], ss[w]);
        r.sx += sxs[w];
        r.nan |= snan[w];
      }
    }
  }
}

// Folds n values into a thread's running statistics.
template <typename A, int N>
__device__ __forceinline__ void online_chunk(const A* xs, RowStats<A>& r, bool smooth) {
  A cm = -dinf<A>();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    cm = amax(cm, xs[k]);
    r.nan |= xs[k] != xs[k];
  }
  if (cm > r.m) {
    r.s *= dexp(r.m - cm);
    r.m = cm;
  }
  if (r.m != -dinf<A>()) {  // all -inf so far: nothing to add (and exp(-inf - -inf) would be NaN)
#pragma unroll
    for (int k = 0; k < N; ++k) r.s += dexp(xs[k] - r.m);
  }
  if (smooth) {
#pragma unroll
    for (int k = 0; k < N; ++k) r.sx += static_cast<double>(xs[k]);
  }
}

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}

// VN consecutive elements from p, which need not be 16-byte aligned.
template <typename T>
__device__ __forceinline__ Vec<T> load_elems(const T* p) {
  Vec<T> r;
#pragma unroll
  for (int k = 0; k < Vec<T>::N; ++k) r.v[k] = p[k];
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

template <typename scalar_t, int G, int BLOCK>
__global__ __launch_bounds__(BLOCK) void ce_forward_kernel(const CeSideDev d, const CeCommon c, int side) {
  using A = acc_t<scalar_t>;
  constexpr int VN = Vec<scalar_t>::N;
  constexpr int RPB = BLOCK / G;
  constexpr int U = 4;
  const int lane = threadIdx.x % G;
  const int64_t i = int64_t(blockIdx.x) * RPB + threadIdx.x / G;
  const bool active = i < d.rows;
  const double w = side_weight(c.alpha, side);
  const int64_t y = active && w != 0.0 ? d.labels[i] : 0;  // a zero-weight side is not read at all
  const bool skip = !active || w == 0.0 || y == c.ignore;     // uniform within the group
  const bool smooth = c.eps != 0.0;
  const int64_t C = d.classes;
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;

  RowStats<A> st;
  auto vchunk = [&](const Vec<scalar_t>& r) {
    A xs[VN];
#pragma unroll
    for (int k = 0; k < VN; ++k) xs[k] = static_cast<A>(r.v[k]);
    online_chunk<A, VN>(xs, st, smooth);
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
      const int64_t col = k < head ? k : body_end + (k - head);
      const A xs[1] = {static_cast<A>(x[col])};
      online_chunk<A, 1>(xs, st, smooth);
    }
  }
  group_reduce<A, G>(st);

  if (!active || lane != 0) return;
  double lse;
  A loss;
  if (skip) {
    lse = 0.0;
    loss = A(0);
  } else if (st.nan || st.m == dinf<A>() || st.m == -dinf<A>() || y < 0 || y >= C) {
    // a NaN logit, a non-finite max or an out-of-range label: NaN as in ATen (label: see header)
    lse = static_cast<double>(dnan<A>());
    loss = dnan<A>();
  } else {
    // lse in double and (m - x[y]) first: with logits near 1e4 a float lse is off by 5e-4
    const A ls = dlog(st.s);
    lse = static_cast<double>(st.m) + static_cast<double>(ls);
    const A nll = (st.m - static_cast<A>(x[y])) + ls;
    // F.cross_entropy's smoothing, term by term: a -inf logit at the label gives +inf, not NaN
    const A eps = static_cast<A>(c.eps);
    loss = smooth ? (A(1) - eps) * nll + eps * static_cast<A>(lse - st.sx / static_cast<double>(C)) : nll;
  }
  d.lse[i] = lse;
  if (d.row_loss) static_cast<A*>(d.row_loss)[i] = loss;
  if (d.out_none) {
    // a zero-weight side is not evaluated: its outputs are 0 even where the loss would be NaN
    static_cast<A*>(d.out_none)[i] = static_cast<A>(w == 0.0 ? 0.0 : w * static_cast<double>(loss));
  }
}

template <typename scalar_t, int G, int BLOCK>
__global__ __launch_bounds__(BLOCK) void ce_backward_kernel(const CeSideDev d, const CeCommon c, int side) {
  using A = acc_t<scalar_t>;
  constexpr int VN = Vec<scalar_t>::N;
  constexpr int RPB = BLOCK / G;
  constexpr int U = 4;
  const int lane = threadIdx.x % G;
  const int64_t i = int64_t(blockIdx.x) * RPB + threadIdx.x / G;
  if (i >= d.rows) return;  // no group-wide collectives below
  const int64_t C = d.classes;
  scalar_t* g = static_cast<scalar_t*>(d.grad) + i * C;
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;
  const double w = side_weight(c.alpha, side);
  const int64_t y = d.labels[i];

  constexpr int kZero = 0, kNaN = 1, kGrad = 2;
  int mode = kGrad;
  A lse_hi = A(0), lse_lo = A(0), scale = A(0);
  if (w == 0.0 || y == c.ignore) {
    mode = kZero;
  } else {
    // the grad_output in the accumulation type (per row, or one for the reduced loss)
    const double gv = d.g_rows ? static_cast<double>(static_cast<const A*>(d.g_rows)[i * d.g_stride])
                               : (d.g_dev ? *d.g_dev : d.g_host);
    const double sc = c.reduction == kMean ? gv * w / c.denom[side] : gv * w;
    scale = static_cast<A>(sc);
    const double lse = d.lse[i];
    // x - lse as (x - hi) - lo: exact enough in fp32 even for logits near 1e4
    lse_hi = static_cast<A>(lse);
    lse_lo = static_cast<A>(lse - static_cast<double>(lse_hi));
    // lse is NaN for rows the forward found non-finite or mislabelled; labels are re-checked in
    // case they changed in place since the forward
    if (!(lse > -1e308 && lse < 1e308) || y < 0 || y >= C) mode = kNaN;
  }
  const A eps = static_cast<A>(c.eps);
  const A off = scale * eps / A(C);
  const A k1 = scale * (A(1) - eps);
  // fp32 (fp64) all the way, rounded once: p_y - 1 must not be formed in bf16
  auto elem = [&](A xv, int64_t col) -> A {
    if (mode == kZero) return A(0);
    if (mode == kNaN) return dnan<A>();
    A e = dexp((xv - lse_hi) - lse_lo) * scale - off;
    if (col == y) e -= k1;
    return e;
  };

  // The stores are vectorised on the gradient row's own alignment. The logits are read with vector
  // loads when their row shares that misalignment (always for contiguous, 16-byte aligned logits),
  // element by element otherwise; zero and NaN rows do not read them at all.
  const int64_t head = head_elems(g, C);
  const int64_t nvec = (C - head) / VN;
  const int64_t body_end = head + nvec * VN;
  const bool x_vec = head == head_elems(x, C);
  int64_t v = lane;
  auto body = [&](const Vec<scalar_t>& r, int64_t c0) {
    Vec<scalar_t> o;
#pragma unroll
    for (int k = 0; k < VN; ++k) o.v[k] = static_cast<scalar_t>(elem(static_cast<A>(r.v[k]), c0 + k));
    store_vec(g + c0, o);
  };
  if (mode == kGrad && x_vec) {
    for (; v + (U - 1) * G < nvec; v += U * G) {
      Vec<scalar_t> r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = load_vec(x + head + (v + u * G) * VN);
#pragma unroll
      for (int u = 0; u < U; ++u) body(r[u], head + (v + u * G) * VN);
    }
  }
  for (; v < nvec; v += G) {
    const int64_t c0 = head + v * VN;
    Vec<scalar_t> r{};
    if (mode == kGrad) r = x_vec ? load_vec(x + c0) : load_elems(x + c0);
    body(r, c0);
  }
  const int64_t nscalar = head + (C - body_end);
  for (int64_t k = lane; k < nscalar; k += G) {
    const int64_t col = k < head ? k : body_end + (k - head);
    const A xv = mode == kGrad ? static_cast<A>(x[col]) : A(0);
    g[col] = static_cast<scalar_t>(elem(xv, col));
  }
}

// Rows with class weights or probability targets: a warp per row, element by element (the less
// common case, kept simple). A row's class coefficients, for the loss sums:
//   probability targets  q[c] = w[c] * ((1 - eps) * t[c] + eps/C)
//   class indices        q[c] = w[c]  (the label-smoothing sum)
// (w = 1 without class weights). Both kernels are launched with kWeightedBlock threads.
constexpr int kWeightedBlock = 256;

template <typename scalar_t>
__device__ __forceinline__ double loss_coef(const CeSideDev& d, const scalar_t* t, int64_t col, double eps) {
  const auto* cw = static_cast<const acc_t<scalar_t>*>(d.class_weight);
  const double wc = cw ? static_cast<double>(cw[col]) : 1.0;
  return t ? wc * ((1.0 - eps) * static_cast<double>(t[col]) + eps / static_cast<double>(d.classes)) : wc;
}

// F.cross_entropy's formulas (csrc/cpu/row_kernels.h, ce_weighted_row), from the online row
// statistics and the double sums sq = sum(q), sqx = sum(q * x): sq * lse - sqx is sum(q * (lse - x)).
template <typename scalar_t>
__global__ __launch_bounds__(kWeightedBlock) void ce_weighted_forward_kernel(const CeSideDev d, const CeCommon c,
                                                                              int side) {
  using A = acc_t<scalar_t>;
  constexpr int G = 32;  // a warp per row: a warp past the last row leaves as a whole
  const int lane = threadIdx.x % G;
  const int64_t i = int64_t(blockIdx.x) * (kWeightedBlock / G) + threadIdx.x / G;
  if (i >= d.rows) return;
  const int64_t C = d.classes;
  const double w = side_weight(c.alpha, side);
  const int64_t y = d.labels && w != 0.0 ? d.labels[i] : 0;  // a zero-weight side is not read at all
  const bool skip = w == 0.0 || (d.labels && y == c.ignore);
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;
  const scalar_t* t = d.targets ? static_cast<const scalar_t*>(d.targets) + i * C : nullptr;
  const bool sums = t != nullptr || c.eps != 0.0;  // an index row without smoothing needs x[y] and w[y] only
  RowStats<A> st;
  double sq = 0.0, sqx = 0.0;
  if (!skip) {
    for (int64_t col = lane; col < C; col += G) {
      const A xs[1] = {static_cast<A>(x[col])};
      online_chunk<A, 1>(xs, st, false);
      if (sums) {
        const double q = loss_coef(d, t, col, c.eps);
        sq += q;
        sqx += q * static_cast<double>(xs[0]);  // a -inf logit with q = 0 gives NaN, as F's 0 * log(0)
      }
    }
  }
  group_reduce<A, G>(st);
  sq = warp_sum(sq);
  sqx = warp_sum(sqx);
  if (lane != 0) return;
  double lse, loss;
  if (skip) {
    lse = loss = 0.0;
  } else if (st.nan || st.m == dinf<A>() || st.m == -dinf<A>() || (d.labels && (y < 0 || y >= C))) {
    lse = loss = dnan<double>();  // as ce_forward_kernel
  } else {
    const A ls = dlog(st.s);
    lse = static_cast<double>(st.m) + static_cast<double>(ls);
    if (t) {
      loss = sq * lse - sqx;
    } else {
      const double wy = d.class_weight ? static_cast<double>(static_cast<const A*>(d.class_weight)[y]) : 1.0;
      const double nll = static_cast<double>((st.m - static_cast<A>(x[y])) + ls);
      loss = (1.0 - c.eps) * (wy * nll);
      if (c.eps != 0.0) loss += c.eps / static_cast<double>(C) * (sq * lse - sqx);
    }
  }
  d.lse[i] = lse;
  if (d.row_loss) static_cast<A*>(d.row_loss)[i] = static_cast<A>(loss);
  if (d.out_none) static_cast<A*>(d.out_none)[i] = static_cast<A>(w == 0.0 ? 0.0 : w * loss);
}

// grad = scale * (K * exp(x - lse) - q) with the gradient's coefficients q[c] = w[c] * ((1 - eps) * t[c]
// + eps/C), t the one-hot of the label for class indices, and K = sum(q).
template <typename scalar_t>
__global__ __launch_bounds__(kWeightedBlock) void ce_weighted_backward_kernel(const CeSideDev d, const CeCommon c,
                                                                               int side) {
  using A = acc_t<scalar_t>;
  constexpr int G = 32;
  const int lane = threadIdx.x % G;
  const int64_t i = int64_t(blockIdx.x) * (kWeightedBlock / G) + threadIdx.x / G;
  if (i >= d.rows) return;
  const int64_t C = d.classes;
  scalar_t* g = static_cast<scalar_t*>(d.grad) + i * C;
  const scalar_t* x = static_cast<const scalar_t*>(d.logits) + i * d.row_stride;
  const scalar_t* t = d.targets ? static_cast<const scalar_t*>(d.targets) + i * C : nullptr;
  const A* cw = static_cast<const A*>(d.class_weight);
  const double w = side_weight(c.alpha, side);
  const int64_t y = d.labels ? d.labels[i] : 0;

  constexpr int kZero = 0, kNaN = 1, kGrad = 2;
  int mode = kGrad;
  double scale = 0.0, lse = 0.0;
  if (w == 0.0 || (d.labels && y == c.ignore)) {
    mode = kZero;
  } else {
    const double gv = d.g_rows ? static_cast<double>(static_cast<const A*>(d.g_rows)[i * d.g_stride])
                               : (d.g_dev ? *d.g_dev : d.g_host);
    scale = c.reduction == kMean ? gv * w / c.denom[side] : gv * w;
    lse = d.lse[i];
    if (!(lse > -1e308 && lse < 1e308) || (d.labels && (y < 0 || y >= C))) mode = kNaN;
  }
  const double off = c.eps / static_cast<double>(C), keep = 1.0 - c.eps;
  auto q = [&](int64_t col) -> double {
    const double wc = cw ? static_cast<double>(cw[col]) : 1.0;
    return wc * (t ? keep * static_cast<double>(t[col]) + off : (col == y ? keep + off : off));
  };
  double k = 0.0;
  if (mode == kGrad) {
    for (int64_t col = lane; col < C; col += G) k += q(col);
  }
  k = warp_sum(k);  // mode is uniform across the warp (one row)
  const A lse_hi = static_cast<A>(lse), lse_lo = static_cast<A>(lse - static_cast<double>(lse_hi));
  for (int64_t col = lane; col < C; col += G) {
    A v = A(0);
    if (mode == kNaN) {
      v = dnan<A>();
    } else if (mode == kGrad) {
      const A e = dexp((static_cast<A>(x[col]) - lse_hi) - lse_lo);
      v = static_cast<A>(scale) * (static_cast<A>(k) * e - static_cast<A>(q(col)));
    }
    g[col] = static_cast<scalar_t>(v);
  }
}

// One block: per-side sums of the row losses and the divisors of reduction mean (F.cross_entropy's:
// the number of non-ignored rows, the sum of their labels' class weights, or the number of rows with
// probability targets), in a fixed order.
constexpr int kFinalizeThreads = 1024;

template <typename scalar_t>
__global__ __launch_bounds__(kFinalizeThreads) void ce_finalize_kernel(const CeSideDev s, const CeSideDev t,
                                                                        const CeCommon c, acc_t<scalar_t>* term_s,
                                                                        acc_t<scalar_t>* term_t, double* denom) {
  using A = acc_t<scalar_t>;
  __shared__ double dsm[32];
  __shared__ double csm[32];
  for (int sd = 0; sd < 2; ++sd) {
    const CeSideDev& d = sd == 0 ? s : t;
    const double w = side_weight(c.alpha, sd);
    const A* cw = static_cast<const A*>(d.class_weight);
    double cnt = 0.0;
    double term = 0.0;
    if (w != 0.0) {  // uniform across the block; a zero-weight term is not evaluated
      double sum = 0.0;
      for (int64_t r = threadIdx.x; r < d.rows; r += blockDim.x) {
        if (d.labels == nullptr) {
          cnt += 1.0;
        } else if (const int64_t y = d.labels[r]; y != c.ignore) {
          cnt += cw == nullptr ? 1.0 : (y >= 0 && y < d.classes ? static_cast<double>(cw[y]) : dnan<double>());
        }
        if (d.row_loss) sum += static_cast<double>(static_cast<const A*>(d.row_loss)[r]);
      }
      sum = block_sum(sum, dsm);
      cnt = block_sum(cnt, csm);
      term = c.reduction == kMean ? w * (sum / cnt) : w * sum;
    }
    if (threadIdx.x == 0) {
      denom[sd] = cnt;
      A* out = sd == 0 ? term_s : term_t;
      if (out) *out = static_cast<A>(term);
    }
  }
}

// Rows of one side; G (threads per row) from this side's own class count.
template <typename scalar_t, bool kBackward>
void launch_side(const CeSideDev& d, const CeCommon& c, int side, cudaStream_t stream) {
  if (d.rows <= 0 || d.classes <= 0) return;
  if (d.weighted) {
    const int64_t blocks = (d.rows + kWeightedBlock / 32 - 1) / (kWeightedBlock / 32);
    TORCH_CHECK(blocks < INT_MAX, "alpha_weighted_cross_entropy: too many rows (", d.rows, ")");
    if constexpr (kBackward) {
      ce_weighted_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWeightedBlock, 0, stream>>>(d, c, side);
    } else {
      ce_weighted_forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWeightedBlock, 0, stream>>>(d, c, side);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int VN = Vec<scalar_t>::N;
  const int64_t nvec = (d.classes + VN - 1) / VN;
  auto go = [&](auto g_c, auto b_c) {
    constexpr int G = decltype(g_c)::value, B = decltype(b_c)::value;
    constexpr int RPB = B / G;
    const int64_t blocks = (d.rows + RPB - 1) / RPB;
    TORCH_CHECK(blocks < INT_MAX, "alpha_weighted_cross_entropy: too many rows (", d.rows, ")");
    if constexpr (kBackward) {
      ce_backward_kernel<scalar_t, G, B><<<static_cast<unsigned>(blocks), B, 0, stream>>>(d, c, side);
    } else {
      ce_forward_kernel<scalar_t, G, B><<<static_cast<unsigned>(blocks), B, 0, stream>>>(d, c, side);
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

// What forward and backward both need: the flattened sides, their device views and the shared
// parameters. Keeps the tensors the views point into alive until the launches are queued.
struct CeCall {
  Tensor alpha_keep;
  std::array<CeSide, 2> h;
  std::array<CeSideDev, 2> d;
  CeCommon c;
  SideWeights w;
};

CeCall prepare_call(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                    int64_t ignore, double eps, int64_t reduction, const std::optional<Tensor>& sw,
                    const std::optional<Tensor>& tw) {
  check_two_sided_call(sl, tl, reduction);
  check_on_device({&sl, &sy, &tl, &ty}, alpha);
  CeCall call{Tensor(), {make_ce_side(sl, sy, sw), make_ce_side(tl, ty, tw)}, {}, CeCommon(), side_weights(alpha)};
  call.c.alpha = make_alpha_arg(alpha, call.alpha_keep);
  call.c.ignore = ignore;
  call.c.eps = eps;
  call.c.reduction = static_cast<int>(reduction);
  for (int k = 0; k < 2; ++k) {
    const CeSide& h = call.h[k];
    CeSideDev& d = call.d[k];
    d.logits = h.logits.const_data_ptr();
    if (h.soft) {
      d.targets = h.labels.const_data_ptr();
    } else {
      d.labels = h.labels.const_data_ptr<int64_t>();
    }
    if (h.class_weight.defined()) d.class_weight = h.class_weight.const_data_ptr();
    d.weighted = h.soft || h.class_weight.defined();
    d.rows = h.rows;
    d.classes = h.classes;
    d.row_stride = h.row_stride;
  }
  return call;
}

void launch_backward(const CeCall& call, at::ScalarType dtype, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "alpha_weighted_cross_entropy_backward_cuda", [&] {
    for (int k = 0; k < 2; ++k) {
      if (call.d[k].grad != nullptr) launch_side<scalar_t, true>(call.d[k], call.c, k, stream);
    }
  });
}

LossForward forward(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha,
                    int64_t ignore, double eps, int64_t reduction, std::optional<Tensor> sw, std::optional<Tensor> tw,
                    std::array<bool, 2> write_grad) {
  c10::cuda::CUDAGuard device_guard(sl.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CeCall call = prepare_call(sl, sy, tl, ty, alpha, ignore, eps, reduction, sw, tw);
  const auto opts = sl.options();
  const auto acc = at::toOpMathType(sl.scalar_type());
  std::array<Tensor, 2> lse, terms, row_loss, grads;
  Tensor denom = at::empty({2}, opts.dtype(at::kDouble));
  for (int k = 0; k < 2; ++k) {
    CeSideDev& d = call.d[k];
    lse[k] = at::empty({d.rows}, opts.dtype(at::kDouble));
    d.lse = lse[k].mutable_data_ptr<double>();
    if (reduction == kNone) {
      terms[k] = at::empty(call.h[k].label_sizes, opts.dtype(acc));
      d.out_none = terms[k].mutable_data_ptr();
    } else {
      terms[k] = at::empty({}, opts.dtype(acc));
      row_loss[k] = at::empty({d.rows}, opts.dtype(acc));
      d.row_loss = row_loss[k].mutable_data_ptr();
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sl.scalar_type(), "alpha_weighted_cross_entropy_cuda", [&] {
    for (int k = 0; k < 2; ++k) launch_side<scalar_t, false>(call.d[k], call.c, k, stream);
    using A = acc_t<scalar_t>;
    A* ts = reduction == kNone ? nullptr : terms[0].mutable_data_ptr<A>();
    A* tt = reduction == kNone ? nullptr : terms[1].mutable_data_ptr<A>();
    ce_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(call.d[0], call.d[1], call.c, ts, tt,
                                                                     denom.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Gradients for a unit grad_output, where asked: the backward kernel with g = 1.
  for (int k = 0; k < 2; ++k) {
    const GradPlan plan = plan_grad(write_grad[k], call.w.skipped(k));
    grads[k] = grad_buffer(plan, call.h[k].logits_sizes, opts, empty_tensor);
    call.d[k].grad = plan == GradPlan::kCompute ? grads[k].mutable_data_ptr() : nullptr;
    call.d[k].g_host = 1.0;
  }
  call.c.denom = denom.const_data_ptr<double>();
  launch_backward(call, sl.scalar_type(), stream);
  return {terms[0], terms[1], {lse[0], lse[1], denom}, grads[0], grads[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sl, const Tensor& sy, const Tensor& tl, const Tensor& ty,
                                          const Tensor& alpha, int64_t ignore, double eps, int64_t reduction,
                                          std::optional<Tensor> sw, std::optional<Tensor> tw) {
  auto out = forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, std::move(sw), std::move(tw), {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

SideGrads backward(const std::optional<Tensor>& g_s, const std::optional<Tensor>& g_t, const Tensor& sl,
                   const Tensor& sy, const Tensor& tl, const Tensor& ty, const Tensor& alpha, at::TensorList saved,
                   int64_t ignore, double eps, int64_t reduction, std::optional<Tensor> sw, std::optional<Tensor> tw,
                   std::array<bool, 2> mask) {
  c10::cuda::CUDAGuard device_guard(sl.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CeCall call = prepare_call(sl, sy, tl, ty, alpha, ignore, eps, reduction, sw, tw);
  TORCH_CHECK(saved.size() == 3 && saved[2].numel() == 2, "saved must be the forward's {lse, lse, denominators}");
  const auto opts = sl.options();
  const auto acc = at::toOpMathType(sl.scalar_type());
  const Tensor denom = saved[2].to(sl.device(), at::kDouble).contiguous();
  call.c.denom = denom.const_data_ptr<double>();
  const std::array<const std::optional<Tensor>*, 2> gout = {&g_s, &g_t};
  std::array<Tensor, 2> grads, lse, keep;
  for (int k = 0; k < 2; ++k) {
    CeSideDev& d = call.d[k];
    const std::optional<Tensor>& go = *gout[k];
    const GradPlan plan = plan_grad(mask[k], call.w.skipped(k), go.has_value() && go->defined());
    grads[k] = grad_buffer(plan, call.h[k].logits_sizes, opts, empty_tensor);
    if (plan != GradPlan::kCompute) continue;
    d.grad = grads[k].mutable_data_ptr();
    lse[k] = saved[k].to(sl.device(), at::kDouble).contiguous();
    TORCH_CHECK(lse[k].numel() == d.rows, "saved lse does not match the logits");
    d.lse = lse[k].mutable_data_ptr<double>();
    if (reduction == kNone) {
      TORCH_CHECK(go->numel() == d.rows, "grad_output of a per-row loss must have one element per row");
      // in the accumulation type (a copy for bf16/fp16 outputs, whose grad_output is not rounded
      // further); an expanded float grad_output (stride 0) stays a view, read through g_stride
      keep[k] = go->to(sl.device(), acc).reshape({d.rows});
      d.g_rows = keep[k].const_data_ptr();
      d.g_stride = d.rows > 1 ? keep[k].stride(0) : 0;
    } else {
      TORCH_CHECK(go->numel() == 1, "grad_output of a reduced loss must have one element");
      if (go->is_cpu()) {
        d.g_host = go->item<double>();  // host memory: no device sync
      } else {
        keep[k] = go->reshape({}).to(at::kDouble).contiguous();
        d.g_dev = keep[k].const_data_ptr<double>();
      }
    }
  }
  launch_backward(call, sl.scalar_type(), stream);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  FASTADAPT_IMPL(m, alpha_weighted_cross_entropy, forward_public);
  FASTADAPT_IMPL(m, _alpha_weighted_cross_entropy_forward, forward);
  FASTADAPT_IMPL(m, _alpha_weighted_cross_entropy_backward, backward);
}

}  // namespace fastadapt::cuda
