// Body of the vectorised row kernels. Included by one .cpp per CPU capability, each of which sets
// CPU_CAPABILITY (and the matching GCC target) first; at::vec's types live in an inline namespace
// named after the capability, so the copies never collide.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "cpu/loss_rows.h"

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

template <typename T>
inline T row_max(const T* x, int64_t C) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  T m = -std::numeric_limits<T>::infinity();
  if (C >= W) {
    V vm = V::loadu(x);
    for (i = W; i + W <= C; i += W) vm = at::vec::maximum(vm, V::loadu(x + i));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < C; ++i) m = max_nan(m, x[i]);
  return m;
}

template <typename T>
inline void fill(T* p, int64_t n, T v) {
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

template <typename T, bool kGrad, bool kSmooth>
T ce_row_t(const T* x, int64_t C, int64_t y, T eps, T* grad, T scale, double* lse_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T m = row_max(x, C);
  if (!std::isfinite(m)) {  // NaN in the row, +inf, or all -inf: log_softmax is NaN, as in ATen
    *lse_out = nan;
    if (kGrad) fill(grad, C, nan);
    return nan;
  }
  // sum of exp(x - m) and of x; with kGrad the exponentials are parked in grad (cache-resident).
  const V vm(m);
  V vs(0), vx(0);
  int64_t i = 0;
  for (; i + W <= C; i += W) {
    V xv = V::loadu(x + i);
    V e = vexp(xv - vm);
    if (kGrad) e.store(grad + i);
    vs = vs + e;
    if (kSmooth) vx = vx + xv;
  }
  T s = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vs);
  T sx = kSmooth ? at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vx) : T(0);
  for (; i < C; ++i) {
    T e = std::exp(x[i] - m);
    if (kGrad) grad[i] = e;
    s += e;
    if (kSmooth) sx += x[i];
  }
  *lse_out = double(m) + double(std::log(s));
  const T off = kSmooth ? eps / T(C) : T(0);
  if (kGrad) {
    const V vk(scale / s), vo(scale * off);
    for (i = 0; i + W <= C; i += W) (V::loadu(grad + i) * vk - vo).store(grad + i);
    const T k = scale / s, o = scale * off;
    for (; i < C; ++i) grad[i] = grad[i] * k - o;
    grad[y] -= scale * (T(1) - eps);
  }
  // (m - x[y]) first: with logits near 1e4, lse - x[y] would lose the answer to rounding.
  T loss = (m - x[y]) + std::log(s);
  if (kSmooth) loss += eps * (x[y] - sx / T(C));
  return loss;
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
  for (; i < C; ++i) grad[i] = std::exp((x[i] - hi) - lo) * scale - o;
  grad[y] -= scale * (T(1) - eps);
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
  double s = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    T d = x[i] - y[i];
    s += double(d) * double(d);
    if (grad) grad[i] = d * scale;
    if (elem) elem[i] = d * d * w;
  }
  return s;
}

template <typename T>
LossRowFns<T> make() {
  return LossRowFns<T>{&ce_row<T>, &ce_grad_row<T>, &mse_chunk<T>};
}

}  // namespace

LossRowFns<float> fns_float() { return make<float>(); }
LossRowFns<double> fns_double() { return make<double>(); }

}  // namespace fastadapt::cpu::CPU_CAPABILITY
