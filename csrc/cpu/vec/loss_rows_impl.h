// Body of the vectorised loss rows (see LossRowFns in cpu/row_kernels.h), built per capability by
// row_kernels_impl.h.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <cstring>
#include <limits>

#include "cpu/row_kernels.h"

namespace fastadapt::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
inline T max_nan(T a, T b) {
  return (a != a) ? a : ((b != b || b > a) ? b : a);
}

// float: the 20-ULP exponential (about 2e-6 relative), twice the speed of Sleef's 1-ULP one; it does
// not propagate NaN, which is why rows with a non-finite max take the NaN path before any exp.
// double keeps the 1-ULP exponential: float64 is the gradcheck dtype.
inline Vectorized<float> vexp(const Vectorized<float>& v) { return v.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& v) { return v.exp(); }

// The last partial vector of a row, padded with `pad` (masked load: nothing past the row is read).
template <typename T>
inline Vectorized<T> load_tail(const T* p, int64_t n, T pad) {
  return Vectorized<T>::set(Vectorized<T>(pad), Vectorized<T>::loadu(p, n), n);
}

template <typename T>
inline T row_max(const T* x, int64_t C) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const T ninf = -std::numeric_limits<T>::infinity();
  V vm(ninf);
  int64_t i = 0;
  for (; i + W <= C; i += W) vm = at::vec::maximum(vm, V::loadu(x + i));
  if (i < C) vm = at::vec::maximum(vm, load_tail(x + i, C - i, ninf));
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
}

// Stores that bypass the cache for gradient rows nobody reads again soon: a plain store first
// reads the line from DRAM (read-for-ownership), so streaming saves a third of the row's traffic.
template <typename T>
inline void store_stream(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the row is handed back
#endif
}

// out[i] = a[i] * k - o over n elements; out is written with streaming stores where aligned.
template <typename T>
inline void scale_shift_stream(const T* a, int64_t n, T k, T o, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) % (W * sizeof(T))) != 0; ++i) out[i] = a[i] * k - o;
  const V vk(k), vo(o);
  for (; i + W <= n; i += W) store_stream(out + i, V::loadu(a + i) * vk - vo);
  for (; i < n; ++i) out[i] = a[i] * k - o;
  stream_fence();
}

template <typename T>
inline void fill(T* p, int64_t n, T v) {
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

// F.cross_entropy's label-smoothed loss from the row's NLL (lse - x[y]) and mean NLL (lse - mean(x)),
// combined as F combines them: a -inf logit at the label gives +inf (with eps = 1, 0 * inf = NaN, as in F).
// The mean NLL is formed as log(s) - sum(x - max)/C: the sum of x - max neither overflows for a finite
// row (logits near 1e38) nor loses the small differences of logits with a large common offset.
template <typename T>
inline T smoothed(T nll, T mean_nll, T eps) {
  return (T(1) - eps) * nll + eps * mean_nll;
}

// One vectorised pass over a row with max m: returns sum(exp(x - m)) and, with kSmooth, sets *sx to
// sum(x - m). With kStore the exponentials are parked in e_row (a per-thread scratch row that stays in
// L2 for the gradient pass). The row's tail is one masked vector: -inf pads give exp() = 0, pads of m
// add nothing to sum(x - m).
template <typename T, bool kStore, bool kSmooth>
inline T exp_sum(const T* x, int64_t C, T m, T* e_row, T* sx) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vm(m);
  V vs(0), vx(0);
  int64_t i = 0;
  for (; i + W <= C; i += W) {
    V xv = V::loadu(x + i);
    V e = vexp(xv - vm);
    if (kStore) e.store(e_row + i);
    vs = vs + e;
    if (kSmooth) vx = vx + (xv - vm);
  }
  const int64_t rest = C - i;
  if (rest > 0) {
    V e = vexp(load_tail(x + i, rest, -std::numeric_limits<T>::infinity()) - vm);
    if (kStore) e.store(e_row + i, rest);
    vs = vs + e;
    if (kSmooth) vx = vx + (load_tail(x + i, rest, m) - vm);  // pads add m - m = 0
  }
  if (kSmooth) *sx = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vx);
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vs);
}

// The per-thread scratch row for the exponentials of a row of C classes.
template <typename T>
inline T* scratch_row(int64_t C) {
  thread_local std::vector<T> row;
  if (static_cast<int64_t>(row.size()) < C) row.resize(C);
  return row.data();
}

template <typename T, bool kGrad, bool kSmooth>
T ce_row_t(const T* x, int64_t C, int64_t y, T eps, T* grad, T scale, double* lse_out) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T m = row_max(x, C);
  if (!std::isfinite(m)) {  // NaN in the row, +inf, or all -inf: log_softmax is NaN, as in ATen
    *lse_out = nan;
    if (kGrad) fill(grad, C, nan);
    return nan;
  }
  T* e_row = kGrad ? scratch_row<T>(C) : nullptr;
  T sx = T(0);
  const T s = exp_sum<T, kGrad, kSmooth>(x, C, m, e_row, &sx);
  *lse_out = double(m) + double(std::log(s));
  const T off = kSmooth ? eps / T(C) : T(0);
  const T xy = x[y];  // read before grad is written: grad may be x
  if (kGrad) {
    scale_shift_stream(e_row, C, scale / s, scale * off, grad);
    grad[y] -= scale * (T(1) - eps);
  }
  // (m - x[y]) first: with logits near 1e4, lse - x[y] would lose the answer to rounding.
  const T ls = std::log(s);
  const T nll = (m - xy) + ls;
  return kSmooth ? smoothed(nll, ls - sx / T(C), eps) : nll;
}

template <typename T>
T ce_row(const T* x, int64_t C, int64_t y, T eps, T* grad, T scale, double* lse) {
  const bool smooth = eps != T(0);
  if (grad != nullptr) {
    return smooth ? ce_row_t<T, true, true>(x, C, y, eps, grad, scale, lse)
                  : ce_row_t<T, true, false>(x, C, y, eps, grad, scale, lse);
  }
  return smooth ? ce_row_t<T, false, true>(x, C, y, eps, grad, scale, lse)
                : ce_row_t<T, false, false>(x, C, y, eps, grad, scale, lse);
}

template <typename T>
void ce_rows_small(const T* x, int64_t row_stride, int64_t C, const int64_t* y, int64_t rows, int64_t ignore, T eps,
                   T* grad, T scale, double* lse, double* loss) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  static_assert(kBlockRows % W == 0 || W > kBlockRows, "block rows must be whole vectors");
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T off = eps / T(C);
  for (int64_t r0 = 0; r0 < rows; r0 += W) {
    const int64_t n = std::min<int64_t>(W, rows - r0);
    // transpose the block: xt[c] holds class c of W rows (absent rows repeat row 0: finite, unused)
    alignas(64) T xt[kSmallClasses][W];
    for (int64_t l = 0; l < W; ++l) {
      const T* xr = x + (r0 + (l < n ? l : 0)) * row_stride;
      for (int64_t c = 0; c < C; ++c) xt[c][l] = xr[c];
    }
    V vm = V::loadu(xt[0]);
    for (int64_t c = 1; c < C; ++c) vm = at::vec::maximum(vm, V::loadu(xt[c]));
    V vs(0), vx(0);
    for (int64_t c = 0; c < C; ++c) {
      V xv = V::loadu(xt[c]);
      V e = vexp(xv - vm);
      e.store(xt[c]);  // xt now holds exp(x - m); x itself is re-read below only at the label
      vs = vs + e;
      vx = vx + (xv - vm);
    }
    alignas(64) T m[W], s[W], sx[W];
    vm.store(m);
    vs.store(s);
    vx.store(sx);
    for (int64_t l = 0; l < n; ++l) {
      const int64_t r = r0 + l, yl = y[r];
      T* gr = grad ? grad + r * C : nullptr;
      if (yl == ignore) {
        lse[r] = 0.0;
        loss[r] = 0.0;
        if (gr) std::memset(gr, 0, sizeof(T) * C);
        continue;
      }
      if (!std::isfinite(m[l])) {  // NaN in the row, +inf, or all -inf: NaN, as in ATen
        lse[r] = loss[r] = nan;
        if (gr) fill(gr, C, nan);
        continue;
      }
      const T xy = x[r * row_stride + yl];
      const T ls = std::log(s[l]);
      lse[r] = double(m[l]) + double(ls);
      const T nll = (m[l] - xy) + ls;
      loss[r] = eps != T(0) ? smoothed(nll, ls - sx[l] / T(C), eps) : nll;
      if (gr) {
        const T k = scale / s[l], o = scale * off;
        for (int64_t c = 0; c < C; ++c) gr[c] = xt[c][l] * k - o;
        gr[yl] -= scale * (T(1) - eps);
      }
    }
  }
}

template <typename T>
void ce_grad_row(const T* x, int64_t C, int64_t y, T eps, double lse, T scale, T* grad) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  if (!std::isfinite(lse)) {
    fill(grad, C, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  // x - lse as (x - hi) - lo: x - hi is exact when x is near lse, so a float row keeps float accuracy.
  const T hi = T(lse), lo = T(lse - double(hi));
  const T o = scale * eps / T(C);
  const V vh(hi), vlo(lo), vk(scale), vo(o);
  int64_t i = 0;
  for (; i + W <= C; i += W) (vexp((V::loadu(x + i) - vh) - vlo) * vk - vo).store(grad + i);
  if (i < C) (vexp((V::loadu(x + i, C - i) - vh) - vlo) * vk - vo).store(grad + i, C - i);
  grad[y] -= scale * (T(1) - eps);
}

// K = sum(q) of ce_weighted_row (cpu/row_kernels.h), in double: a float sum over 32k classes would
// drift past float tolerance. The sum over the classes is there only when it is needed (probability
// targets, or an index with label smoothing).
template <typename T>
double weighted_k(int64_t C, int64_t y, const T* t, const T* w, T eps) {
  const double off = double(eps) / double(C), keep = 1.0 - double(eps);
  if (t == nullptr && eps == T(0)) return w ? double(w[y]) : 1.0;
  double k = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double wc = w ? double(w[c]) : 1.0;
    k += wc * (t ? keep * double(t[c]) + off : off);
  }
  return t ? k : k + keep * (w ? double(w[y]) : 1.0);
}

// grad = scale * (K * e / s - q) from the row's exponentials e = exp(x - m) (or exp(x - lse), s = 1).
template <typename T>
void weighted_grad(const T* e, T inv_s, int64_t C, int64_t y, const T* t, const T* w, T eps, double k, T scale,
                   T* grad) {
  const T ks = T(double(scale) * k) * inv_s, keep = T(1) - eps, off = eps / T(C);
  for (int64_t c = 0; c < C; ++c) {
    const T tc = t ? keep * t[c] + off : off;
    grad[c] = e[c] * ks - scale * (w ? w[c] * tc : tc);
  }
  if (t == nullptr) grad[y] -= scale * keep * (w ? w[y] : T(1));
}

template <typename T>
T ce_weighted_row(const T* x, int64_t C, int64_t y, const T* t, const T* w, T eps, T* grad, T scale, double* lse_out) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T m = row_max(x, C);
  if (!std::isfinite(m)) {  // NaN in the row, +inf, or all -inf: log_softmax is NaN, as in ATen
    *lse_out = nan;
    if (grad) fill(grad, C, nan);
    return nan;
  }
  T* e_row = grad ? scratch_row<T>(C) : nullptr;
  const T s = grad ? exp_sum<T, true, false>(x, C, m, e_row, nullptr)
                   : exp_sum<T, false, false>(x, C, m, nullptr, nullptr);
  const T ls = std::log(s);
  *lse_out = double(m) + double(ls);
  const double off = double(eps) / double(C), keep = 1.0 - double(eps);
  // Each class's lse - x[c] as (m - x[c]) + log(s): exact for logits near 1e4, and a -inf logit gives
  // +inf (times a zero target: NaN, as F's log_softmax * target).
  double loss;
  if (t) {
    double acc = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double q = (w ? double(w[c]) : 1.0) * (keep * double(t[c]) + off);
      acc += q * (double(m - x[c]) + double(ls));
    }
    loss = acc;
  } else {
    const double nll = double((m - x[y]) + ls);
    loss = keep * ((w ? double(w[y]) : 1.0) * nll);
    if (eps != T(0)) {
      double smooth = 0.0;
      for (int64_t c = 0; c < C; ++c) smooth += (w ? double(w[c]) : 1.0) * (double(m - x[c]) + double(ls));
      loss += off * smooth;
    }
  }
  if (grad) weighted_grad(e_row, T(1) / s, C, y, t, w, eps, weighted_k(C, y, t, w, eps), scale, grad);
  return T(loss);
}

template <typename T>
void ce_weighted_grad_row(const T* x, int64_t C, int64_t y, const T* t, const T* w, T eps, double lse, T scale,
                          T* grad) {
  if (!std::isfinite(lse)) {
    fill(grad, C, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  // exp(x - lse) into grad first, as (x - hi) - lo (see ce_grad_row), then the weighted gradient in place
  const T hi = T(lse), lo = T(lse - double(hi));
  for (int64_t c = 0; c < C; ++c) grad[c] = std::exp((x[c] - hi) - lo);
  weighted_grad(grad, T(1), C, y, t, w, eps, weighted_k(C, y, t, w, eps), scale, grad);
}

template <typename T>
double mse_chunk(const T* x, const T* y, int64_t n, T* grad, T scale, T* elem, T w) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc(0);
  const V vk(scale), vw(w);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V d = V::loadu(x + i) - V::loadu(y + i);
    V d2 = d * d;
    acc = acc + d2;
    if (grad) (d * vk).store(grad + i);
    if (elem) (d2 * vw).store(elem + i);
  }
  if (i < n) {  // zero-padded tail: contributes 0 to the sum
    V d = V::loadu(x + i, n - i) - V::loadu(y + i, n - i);
    V d2 = d * d;
    acc = acc + d2;
    if (grad) (d * vk).store(grad + i, n - i);
    if (elem) (d2 * vw).store(elem + i, n - i);
  }
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
}

template <typename T>
LossRowFns<T> loss_fns() {
  return LossRowFns<T>{&ce_row<T>, &ce_rows_small<T>, &ce_grad_row<T>, &ce_weighted_row<T>, &ce_weighted_grad_row<T>,
                       &mse_chunk<T>};
}

}  // namespace
}  // namespace fastadapt::cpu::CPU_CAPABILITY
