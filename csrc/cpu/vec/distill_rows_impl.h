// Body of the vectorised distillation rows (see DistillRowFns in cpu/row_kernels.h), built per
// capability by row_kernels_impl.h after loss_rows_impl.h (vexp, row_max, load_tail, store_stream).
//
// Per element of the first K columns a row needs up to three exponentials: exp(z - max z) for the
// cross-entropy over all C columns, exp((z - max z[:K]) / T) for p and exp((t - max t) / T) for q. The
// KL is formed from shifted values, KL = sum(q * (a - b)) + log(sum f) - log(sum g) with
// a = (t - max t) / T, b = (z - max z[:K]) / T, so that logits with a large common offset keep their
// differences; a class the teacher gives probability 0 (t = -inf, or q underflowing) adds 0, as
// F.kl_div's 0 * log 0 = 0.

namespace fastadapt::cpu::CPU_CAPABILITY {
namespace {

// n <= W elements from p + i: a full vector, or the row's last partial one (nothing past it is read).
template <typename T>
inline Vectorized<T> load_n(const T* p, int64_t i, int64_t n) {
  return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p + i) : Vectorized<T>::loadu(p + i, n);
}

// out[0, n) = at(i, m) (the elements i .. i+m as a vector), streamed where out is vector-aligned.
template <typename T, typename F>
inline void stream_row(T* out, int64_t n, const F& at) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size(), kBytes = W * sizeof(T);
  const int64_t misaligned = int64_t((kBytes - reinterpret_cast<uintptr_t>(out) % kBytes) % kBytes);
  const int64_t head = std::min<int64_t>(n, misaligned / int64_t(sizeof(T)));
  if (head > 0) at(0, head).store(out, head);
  int64_t i = head;
  for (; i + W <= n; i += W) store_stream(out + i, at(i, W));
  if (i < n) at(i, n - i).store(out + i, n - i);
  stream_fence();
}

template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

template <typename T, bool kGrad>
void distill_row_t(const DistillRow<T>& r, T* grad, double* lse, double* ce_out, double* kl_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const T ninf = -std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  const bool ce = r.y >= 0, kd = r.t != nullptr;
  const int64_t C = r.C, K = kd ? r.K : 0;
  const T mk = K > 0 ? row_max(r.z, K) : ninf;
  const T mz = ce ? max_nan(mk, K < C ? row_max(r.z + K, C - K) : ninf) : ninf;
  const T mt = kd ? row_max(r.t, K) : ninf;
  const bool ce_nan = ce && !std::isfinite(mz), kd_nan = kd && !(std::isfinite(mk) && std::isfinite(mt));
  lse[0] = lse[1] = lse[2] = 0.0;
  *ce_out = *kl_out = 0.0;
  if (ce_nan || kd_nan) {  // NaN in a row, +inf, or all -inf: that term is NaN, as in ATen
    if (ce_nan) lse[0] = *ce_out = nan;
    if (kd_nan) lse[1] = lse[2] = *kl_out = nan;
    if (kGrad) fill(grad, C, nan);
    return;
  }
  // e = exp(z - mz) (C), f = exp(b) and g = exp(a) (K each), parked for the gradient
  thread_local std::vector<T> scratch;
  T *e = nullptr, *f = nullptr, *g = nullptr;
  if (kGrad) {
    if (static_cast<int64_t>(scratch.size()) < C + 2 * K) scratch.resize(C + 2 * K);
    e = scratch.data();
    f = e + C;
    g = f + K;
  }
  const V vmz(mz), vmk(mk), vmt(mt), vinv(r.inv_temperature), zero(0);
  V se(0), sx(0), sf(0), sg(0), sd(0);
  // m valid elements from i: pads are -inf (exp gives 0, and q = 0 adds nothing to the KL) and, for
  // sum(z - mz), mz (adds 0)
  auto cols = [&](int64_t i, int64_t m, bool with_kd) {
    const V z = m == W ? V::loadu(r.z + i) : load_tail(r.z + i, m, ninf);
    if (ce) {
      const V ev = vexp(z - vmz);
      se = se + ev;
      sx = sx + ((m == W ? z : load_tail(r.z + i, m, mz)) - vmz);
      if (kGrad) ev.store(e + i, m);
    }
    if (with_kd) {
      const V b = (z - vmk) * vinv;
      const V a = ((m == W ? V::loadu(r.t + i) : load_tail(r.t + i, m, ninf)) - vmt) * vinv;
      const V fv = vexp(b), gv = vexp(a);
      sf = sf + fv;
      sg = sg + gv;
      sd = sd + V::blendv(zero, gv * (a - b), gv != zero);
      if (kGrad) {
        fv.store(f + i, m);
        gv.store(g + i, m);
      }
    }
  };
  int64_t i = 0;
  for (; i + W <= K; i += W) cols(i, W, true);
  if (i < K) cols(i, K - i, true);
  if (ce) {
    // the columns past the teacher's, in the same vector steps from K
    for (i = K; i + W <= C; i += W) cols(i, W, false);
    if (i < C) cols(i, C - i, false);
  }
  const T s_e = reduce_sum(se), s_f = reduce_sum(sf), s_g = reduce_sum(sg);
  if (ce) {
    const T ls = std::log(s_e);
    lse[0] = double(mz) + double(ls);
    // (mz - z[y]) first, as ce_row: with logits near 1e4, lse - z[y] would lose the answer to rounding
    const T nll = (mz - r.z[r.y]) + ls;
    *ce_out = r.eps != T(0) ? smoothed(nll, ls - reduce_sum(sx) / T(C), r.eps) : nll;
  }
  if (kd) {
    const T lf = std::log(s_f), lg = std::log(s_g);
    lse[1] = double(mk) * double(r.inv_temperature) + double(lf);
    lse[2] = double(mt) * double(r.inv_temperature) + double(lg);
    *kl_out = reduce_sum(sd) / s_g + (lf - lg);
  }
  if (!kGrad) return;
  const V kc(ce ? r.ce_scale / s_e : T(0)), oc(ce ? r.ce_scale * r.eps / T(C) : T(0));
  const V kf(kd ? r.kd_scale / s_f : T(0)), kg(kd ? r.kd_scale / s_g : T(0));
  stream_row<T>(grad, C, [&](int64_t j, int64_t m) {
    V v = ce ? load_n(e, j, m) * kc - oc : zero;
    // a vector straddling column K: the distillation part of its first K - j elements only
    if (kd && j < K) v = v + load_n(f, j, std::min(m, K - j)) * kf - load_n(g, j, std::min(m, K - j)) * kg;
    return v;
  });
  if (ce) grad[r.y] -= r.ce_scale * (T(1) - r.eps);
}

template <typename T>
void distill_row(const DistillRow<T>& r, T* grad, double* lse, double* ce, double* kl) {
  if (grad != nullptr) {
    distill_row_t<T, true>(r, grad, lse, ce, kl);
  } else {
    distill_row_t<T, false>(r, grad, lse, ce, kl);
  }
}

template <typename T>
void distill_grad_row(const DistillRow<T>& r, const double* lse, T* grad) {
  using V = Vectorized<T>;
  const bool ce = r.y >= 0, kd = r.t != nullptr;
  const int64_t C = r.C, K = kd ? r.K : 0;
  if ((ce && !std::isfinite(lse[0])) || (kd && !(std::isfinite(lse[1]) && std::isfinite(lse[2])))) {
    fill(grad, C, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  // x - lse as (x - hi) - lo, as ce_grad_row: x - hi is exact when x is near lse
  T hi[3], lo[3];
  for (int k = 0; k < 3; ++k) {
    hi[k] = T(lse[k]);
    lo[k] = T(lse[k] - double(hi[k]));
  }
  const V vinv(r.inv_temperature), kc(r.ce_scale), oc(r.ce_scale * r.eps / T(C)), kk(r.kd_scale), zero(0);
  const V h0(hi[0]), l0(lo[0]), h1(hi[1]), l1(lo[1]), h2(hi[2]), l2(lo[2]);
  stream_row<T>(grad, C, [&](int64_t j, int64_t m) {
    const V z = load_n(r.z, j, m);
    V v = ce ? vexp((z - h0) - l0) * kc - oc : zero;
    if (kd && j < K) {
      const int64_t mk = std::min(m, K - j);
      const V zk = mk == m ? z : load_n(r.z, j, mk);
      // zero pads give exp(-hi) terms past K: masked off by the partial loads' zero lanes below
      const V p = vexp((zk * vinv - h1) - l1), q = vexp((load_n(r.t, j, mk) * vinv - h2) - l2);
      const V d = (p - q) * kk;
      v = v + (mk == m ? d : V::set(zero, d, mk));
    }
    return v;
  });
  if (ce) grad[r.y] -= r.ce_scale * (T(1) - r.eps);
}

template <typename T>
DistillRowFns<T> distill_fns() {
  return DistillRowFns<T>{&distill_row<T>, &distill_grad_row<T>};
}

}  // namespace
}  // namespace fastadapt::cpu::CPU_CAPABILITY
