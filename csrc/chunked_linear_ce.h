// The chunked algorithm of the fused linear + alpha-weighted cross-entropy, written once for the CPU and
// the CUDA kernels (cpu/ and cuda/alpha_weighted_linear_cross_entropy.*); each device supplies only its
// fused row pass and its mean divisor (the `Device` policy below).
//
//   loss = alpha * L(target) + (1 - alpha) * L(source),  L = mean/sum over rows of
//          CE(softcap(h @ W.T + b), y) + z * lse^2,  or the weighted per-row losses (reduction none)
//
// Why chunks: a language model's logits (rows x V) are the memory cliff of the loss. Each side's rows go
// through `chunk` at a time: one GEMM writes the chunk's logits into a buffer reused for every chunk, the
// device's fused row pass turns each row into its loss and its gradient in the same pass, and two more
// GEMMs turn the chunk's dlogits into the chunk's rows of grad_hidden and into grad_weight (+=, one buffer
// in the accumulation type for the whole call: fp32 for bf16). The extra memory is a few chunk x V
// buffers (plus, for bf16, the fp32 weight-gradient buffer), whatever the number of rows.
//
// Why the gradients are computed in the forward pass (reduction mean/sum): grad_weight sums over every
// row, so building it in backward would run the logits GEMM again. Such a loss has one grad_output; the
// autograd node scales the unit-grad_output gradients by it. Reduction none has one grad_output per
// row: its backward op runs the chunked pass again with per-row scales (`row_scale`).
//
// Ignored rows cost no GEMM work where the device can list them without a host sync (the CPU): a chunk
// then gathers its non-ignored rows (index_select) and scatters their gradients back; their loss and
// gradient stay 0.
//
// Determinism: for a given chunk size the chunks are accumulated in a fixed order, per-row losses go to
// a buffer the device sums in a fixed order, and the row passes are row-parallel; what remains is the
// BLAS's own summation order (BENCHMARKS.md, issue 13, for the thread-count check).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "alpha_weighted_linear_cross_entropy.h"
#include "two_sided.h"

namespace fastadapt::linear_ce {

struct Options {
  int64_t ignore = -100;
  double eps = 0.0, z = 0.0;
  std::optional<double> cap;
  int64_t chunk = 1;
};

// What each side of a call needs besides the shared weight: hidden (rows, D) contiguous, labels (rows,)
// int64 contiguous.
struct Side {
  at::Tensor hidden, labels;
};

// Gradient buffers of one call (undefined when not wanted): gh[k] side k's hidden (rows, D) in its
// dtype, gw the weight's and gb the bias's in the accumulation type.
struct Grads {
  std::array<at::Tensor, 2> gh;
  at::Tensor gw, gb;
  bool any(int k) const { return gh[k].defined() || gw.defined() || gb.defined(); }
};

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// One side's rows, chunk by chunk. `scale` (rows,) float64: each row's gradient factor (the side's
// weight over the mean's divisor, or weight x grad_output for reduction none); undefined when no
// gradient is wanted. `keep`: the rows to evaluate (int64 indices) or undefined for all of them.
// Writes the unweighted per-row losses into `loss` (rows,) float64, which must hold zeros where
// `keep` skips rows; gradients are added into g (gh rows are written, zeros where `keep` skips).
template <typename Device>
void side_pass(const Side& s, int k, const at::Tensor& w, const std::optional<at::Tensor>& bias, const Options& o,
               const at::Tensor& keep, const at::Tensor& scale, const Grads& g, const at::Tensor& loss) {
  const bool gathered = keep.defined();
  const int64_t rows = gathered ? keep.numel() : s.hidden.size(0), V = w.size(0), D = w.size(1);
  if (rows == 0) return;
  const bool grads = scale.defined() && g.any(k);
  const int64_t c = std::min(o.chunk, rows);
  const auto acc_type = at::toOpMathType(w.scalar_type());
  const bool widen = acc_type != w.scalar_type();
  // the logits chunk in the inputs' dtype (the unfused composition rounds its logits there too); for
  // bf16 it is widened into xa, and xb later holds the rounded dlogits of grad_hidden's GEMM. The row
  // pass writes dlogits over xa (one buffer fewer, so chunks twice as large for the same memory and
  // half the passes over W and grad_W), except with softcap, whose chain rule reads the capped logits
  // after the gradient is written.
  const at::Tensor xb = at::empty({c, V}, w.options());
  const at::Tensor xa = widen ? at::empty({c, V}, w.options().dtype(acc_type)) : xb;
  const at::Tensor dx = !grads ? at::Tensor() : o.cap ? at::empty({c, V}, xa.options()) : xa;
  const at::Tensor hbuf = gathered ? at::empty({c, D}, s.hidden.options()) : at::Tensor();
  const at::Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < rows; r0 += c) {
    const int64_t n = std::min(c, rows - r0);
    const at::Tensor idx = gathered ? keep.narrow(0, r0, n) : at::Tensor();
    at::Tensor hc = gathered ? hbuf.narrow(0, 0, n) : s.hidden.narrow(0, r0, n);
    if (gathered) at::index_select_out(hc, s.hidden, 0, idx);
    const at::Tensor yc = gathered ? s.labels.index_select(0, idx) : s.labels.narrow(0, r0, n);
    at::Tensor xv = xb.narrow(0, 0, n);
    if (has(bias)) {
      at::addmm_out(xv, *bias, hc, wt);
    } else {
      at::mm_out(xv, hc, wt);
    }
    const at::Tensor xav = xa.narrow(0, 0, n);
    if (widen) xav.copy_(xv);
    const at::Tensor dxv = grads ? dx.narrow(0, 0, n) : at::Tensor();
    const at::Tensor sc = grads ? (gathered ? scale.index_select(0, idx) : scale.narrow(0, r0, n)) : at::Tensor();
    const at::Tensor lc = gathered ? at::empty({n}, loss.options()) : loss.narrow(0, r0, n);
    Device::rows(xav, yc, o, sc, dxv, lc);
    if (gathered) loss.index_copy_(0, idx, lc);
    if (!grads) continue;
    if (g.gh[k].defined()) {
      // grad_hidden's GEMM in the inputs' dtype, on dlogits rounded to it as the unfused composition's
      const at::Tensor d = widen ? xv.copy_(dxv) : dxv;
      if (gathered) {
        g.gh[k].index_copy_(0, idx, at::mm(d, w));
      } else {
        at::Tensor ghc = g.gh[k].narrow(0, r0, n);
        at::mm_out(ghc, d, w);
      }
    }
    // float32 accumulation for bf16: float32 dlogits and hidden, one float32 buffer for the whole call.
    // (A bf16 GEMM per chunk added into it would run at this CPU's AMX rate, but rounds every chunk's
    // partial to bf16 first: BENCHMARKS.md, issue 13.)
    if (g.gw.defined()) g.gw.addmm_(dxv.t(), widen ? hc.to(acc_type) : hc);
    if (g.gb.defined()) g.gb.add_(dxv.sum(0));
  }
}

// Side k's weight as a 0-dim float64 tensor on the inputs' device: 1 - alpha (source) or alpha
// (target), NaN for an alpha outside [0, 1] (which the Python layer rejects first).
inline at::Tensor side_weight(const SideWeights& sw, const at::Tensor& alpha, int k, const at::TensorOptions& dev) {
  if (sw.w[k].has_value()) return at::scalar_tensor(*sw.w[k], dev.dtype(at::kDouble));
  const at::Tensor a = alpha.to(dev.dtype(at::kDouble)).reshape({});
  const at::Tensor wk = k == 0 ? 1.0 - a : a;
  return at::where(a.ge(0.0).logical_and(a.le(1.0)), wk, at::full({}, NAN, wk.options()));
}

// The whole call. grad_rows: undefined for a forward (reduction mean/sum with the gradients of a unit
// grad_output when `want` asks for them; none without gradients), or each side's per-row grad_output
// (reduction none's backward: gradients only, outputs 0 and 1 empty).
// Returns (out0, out1, gh_source, gh_target, gw, gb): out0 the loss (0-dim) and out1 0 elements for
// mean/sum, the two sides' weighted per-row losses for none, in the accumulation type.
template <typename Device>
std::array<at::Tensor, 6> run(const Side (&sides)[2], const at::Tensor& w, const std::optional<at::Tensor>& bias,
                              const at::Tensor& alpha, const Options& o, int64_t reduction, std::array<bool, 4> want,
                              const std::array<at::Tensor, 2>* grad_rows) {
  const SideWeights sw = side_weights(alpha);
  const auto acc = w.options().dtype(at::toOpMathType(w.scalar_type()));
  const auto f64 = w.options().dtype(at::kDouble);
  const bool backward = grad_rows != nullptr, none = reduction == kNone;
  const bool gradients = backward || !none;
  Grads g;
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& h = sides[k].hidden;
    g.gh[k] = gradients && want[k] ? at::zeros_like(h) : at::Tensor();
  }
  if (gradients && want[2]) g.gw = at::zeros(w.sizes(), acc);
  if (gradients && want[3] && has(bias)) g.gb = at::zeros({w.size(0)}, acc);
  // every evaluated side's labels are range-checked (CPU) and counted before any GEMM runs
  std::array<at::Tensor, 2> keep, denom;
  for (int k = 0; k < 2; ++k) {
    if (sw.skipped(k)) continue;  // a zero-weight side is not read
    keep[k] = Device::kept_rows(sides[k], w.size(0), o.ignore);
    if (reduction == kMean) denom[k] = Device::mean_divisor(sides[k], keep[k], o.ignore);
  }
  std::array<at::Tensor, 2> terms;
  at::Tensor total = at::zeros({}, f64);
  for (int k = 0; k < 2; ++k) {
    const Side& s = sides[k];
    const int64_t rows = s.hidden.size(0);
    if (sw.skipped(k)) {
      terms[k] = at::zeros({rows}, acc);
      continue;
    }
    // reduction none's backward: nothing to do for a side without grad_output or wanted gradients
    if (backward && (!(*grad_rows)[k].defined() || !g.any(k))) continue;
    const at::Tensor wk = side_weight(sw, alpha, k, w.options());
    at::Tensor scale;  // (rows,) float64, or undefined: no gradient from this pass
    if (backward) {
      scale = (*grad_rows)[k].to(at::kDouble).reshape({rows}) * wk;
    } else if (gradients && g.any(k)) {
      // F.cross_entropy's mean over no rows is NaN with zero gradients: scale 0 there
      const at::Tensor per = denom[k].defined() ? at::where(denom[k].gt(0), wk / denom[k], at::zeros_like(wk)) : wk;
      scale = per.expand({rows}).contiguous();
    }
    const at::Tensor loss = keep[k].defined() ? at::zeros({rows}, f64) : at::empty({rows}, f64);
    side_pass<Device>(s, k, w, bias, o, keep[k], scale, g, loss);
    if (backward) continue;
    if (none) {
      terms[k] = (loss * wk).to(acc.dtype().toScalarType());
    } else {
      const at::Tensor sum = Device::ordered_sum(loss);
      total = total + (denom[k].defined() ? wk * (sum / denom[k]) : wk * sum);
    }
  }
  at::Tensor out0, out1;
  if (backward) {
    out0 = at::empty({0}, acc);
    out1 = at::empty({0}, acc);
  } else if (none) {
    out0 = terms[0];
    out1 = terms[1];
  } else {
    out0 = total.to(acc.dtype().toScalarType());
    out1 = at::empty({0}, acc);
  }
  auto or_empty = [&](const at::Tensor& t, const at::TensorOptions& opt) { return t.defined() ? t : at::empty({0}, opt); };
  return {out0, out1, or_empty(g.gh[0], sides[0].hidden.options()), or_empty(g.gh[1], sides[1].hidden.options()),
          or_empty(g.gw, acc), or_empty(g.gb, acc)};
}

// What keeps a direct torch.ops call in bounds (the Python layer names the user's errors first).
inline void check_args(const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                       const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t chunk) {
  TORCH_CHECK(chunk > 0, "chunk_size must be positive");
  TORCH_CHECK(w.dim() == 2, "weight must be (V, D)");
  for (const at::Tensor* h : {&sh, &th}) {
    TORCH_CHECK(h->dim() == 2 && h->size(1) == w.size(1), "hidden must be (rows, D) with the weight's D");
    TORCH_CHECK(h->scalar_type() == w.scalar_type(), "hidden and weight must share a dtype");
    TORCH_CHECK(h->device() == w.device(), "hidden and weight must be on one device");
  }
  TORCH_CHECK(sy.numel() == sh.size(0) && ty.numel() == th.size(0), "one label per hidden row");
  TORCH_CHECK(sy.device() == w.device() && ty.device() == w.device(), "labels must be on the weight's device");
  TORCH_CHECK(!sy.is_floating_point() && !ty.is_floating_point(), "labels must be class indices");
  if (has(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == w.scalar_type() &&
                    bias->device() == w.device(),
                "bias must be (V,) in the weight's dtype and device");
  }
}

inline Side make_side(const at::Tensor& h, const at::Tensor& y) {
  return {h.contiguous(), y.reshape({-1}).to(at::kLong).contiguous()};
}

// The three ops, for a device's row pass: the registered kernels are these instantiations.
template <typename Device>
ops::LinearCeForward forward_op(const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th,
                                const at::Tensor& ty, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                const at::Tensor& alpha, int64_t ignore, double eps, int64_t reduction, double z,
                                std::optional<double> cap, int64_t chunk, std::array<bool, 4> write_grad) {
  check_args(sh, sy, th, ty, w, bias, chunk);
  check_reduction(reduction);
  TORCH_CHECK(alpha.numel() == 1 && (alpha.is_cpu() || alpha.device() == w.device()),
              "alpha must be one value, on the CPU or the inputs' device");
  const typename Device::Guard guard(w);
  const Side sides[2] = {make_side(sh, sy), make_side(th, ty)};
  const auto r = run<Device>(sides, w, bias, alpha, Options{ignore, eps, z, cap, chunk}, reduction, write_grad,
                             nullptr);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

template <typename Device>
ops::LinearCeOut public_op(const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                           const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                           int64_t ignore, double eps, int64_t reduction, double z, std::optional<double> cap,
                           int64_t chunk) {
  const auto r = forward_op<Device>(sh, sy, th, ty, w, bias, alpha, ignore, eps, reduction, z, cap, chunk, {});
  return {std::get<0>(r), std::get<1>(r)};
}

template <typename Device>
ops::LinearCeGrads backward_op(const std::optional<at::Tensor>& gs, const std::optional<at::Tensor>& gt,
                               const at::Tensor& sh, const at::Tensor& sy, const at::Tensor& th, const at::Tensor& ty,
                               const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                               int64_t ignore, double eps, double z, std::optional<double> cap, int64_t chunk,
                               std::array<bool, 4> write_grad) {
  check_args(sh, sy, th, ty, w, bias, chunk);
  TORCH_CHECK(alpha.numel() == 1 && (alpha.is_cpu() || alpha.device() == w.device()),
              "alpha must be one value, on the CPU or the inputs' device");
  const std::array<at::Tensor, 2> go = {has(gs) ? *gs : at::Tensor(), has(gt) ? *gt : at::Tensor()};
  for (int k = 0; k < 2; ++k) {
    TORCH_CHECK(!go[k].defined() || (go[k].numel() == (k == 0 ? sh : th).size(0) && go[k].device() == w.device()),
                "grad_output must have one value per row of its side, on the inputs' device");
  }
  const typename Device::Guard guard(w);
  const Side sides[2] = {make_side(sh, sy), make_side(th, ty)};
  const auto r = run<Device>(sides, w, bias, alpha, Options{ignore, eps, z, cap, chunk}, kNone, write_grad, &go);
  return {r[2], r[3], r[4], r[5]};
}

}  // namespace fastadapt::linear_ce
