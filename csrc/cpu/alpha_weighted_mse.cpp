// CPU kernels of the alpha-weighted MSE:
//   loss = alpha * mean((target_pred - target_target)^2) + (1 - alpha) * mean((source_pred - source_target)^2)
//
// What it fuses: the difference, the square, the per-side reduction, the alpha weighting and (under
// autograd, reduction mean/sum) the gradient 2w(x-y)/n for a unit grad_output. One pass reads pred
// and target once and writes the gradient once; eager PyTorch makes about five passes and three
// temporaries. Both sides are cut into fixed-size chunks that share one at::parallel_for; the
// per-chunk sums are added in chunk order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/grad_buffer.h"
#include "cpu/loss_rows.h"
#include "loss_common.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;
constexpr int64_t kChunk = 16384;  // elements per task: fits L1/L2 for the bf16 widening buffers

struct MseSide {
  Tensor x, y;  // flat, contiguous
  int64_t n = 0, chunks = 0;
  double weight = 0.0;
  bool evaluated = false;
};

MseSide make_side(const Tensor& pred, const Tensor& target, double w) {
  MseSide s;
  s.x = pred.reshape(-1).contiguous();
  s.y = target.reshape(-1).contiguous();
  s.n = s.x.numel();
  s.chunks = (s.n + kChunk - 1) / kChunk;
  s.weight = w;
  s.evaluated = w != 0.0;
  return s;
}

// One pass over both sides: chunk sums into partial[], optional grad = scale*(x-y), optional
// elem = w*(x-y)^2. Skipped (zero-weight) sides are not read.
template <typename scalar_t>
void run_chunks(const std::array<const MseSide*, 2>& sides, std::array<Tensor, 2>& grad, std::array<double, 2> scale,
                std::array<Tensor, 2>& elem, std::vector<double>& partial) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const auto& f = row_fns<acc_t>();
  const int64_t total = sides[0]->chunks + sides[1]->chunks;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(kWiden ? kChunk : 0), ys(kWiden ? kChunk : 0), gs(kWiden ? kChunk : 0),
        es(kWiden ? kChunk : 0);
    for (int64_t c = begin; c < end; ++c) {
      const int k = c < sides[0]->chunks ? 0 : 1;
      const MseSide& s = *sides[k];
      const int64_t ci = k == 0 ? c : c - sides[0]->chunks;
      const int64_t off = ci * kChunk, len = std::min(kChunk, s.n - off);
      if (!s.evaluated) {
        partial[c] = 0.0;
        continue;
      }
      const scalar_t* x = s.x.const_data_ptr<scalar_t>() + off;
      const scalar_t* y = s.y.const_data_ptr<scalar_t>() + off;
      scalar_t* g = grad[k].numel() ? grad[k].data_ptr<scalar_t>() + off : nullptr;
      scalar_t* e = elem[k].numel() ? elem[k].data_ptr<scalar_t>() + off : nullptr;
      if constexpr (kWiden) {
        at::vec::convert(x, xs.data(), len);
        at::vec::convert(y, ys.data(), len);
        partial[c] = f.mse_chunk(xs.data(), ys.data(), len, g ? gs.data() : nullptr, acc_t(scale[k]),
                                 e ? es.data() : nullptr, acc_t(s.weight));
        if (g) at::vec::convert(gs.data(), g, len);
        if (e) at::vec::convert(es.data(), e, len);
      } else {
        partial[c] = f.mse_chunk(x, y, len, g, acc_t(scale[k]), e, acc_t(s.weight));
      }
    }
  });
}

using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

ForwardOut forward(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt, const Tensor& alpha,
                   int64_t reduction, std::array<bool, 2> write_grad) {
  check_mse_args(sp, st, tp, tt, alpha, reduction);
  TORCH_CHECK(alpha.is_cpu(), "alpha must be on the CPU for CPU inputs, got ", alpha.device());
  const double a = cpu_alpha_value(alpha);
  const MseSide s = make_side(sp, st, 1.0 - a), t = make_side(tp, tt, a);
  const std::array<const MseSide*, 2> sides = {&s, &t};
  const std::array<const Tensor*, 2> preds = {&sp, &tp};
  const auto opts = sp.options();
  std::array<Tensor, 2> grad, elem;
  std::array<double, 2> scale{};
  for (int k = 0; k < 2; ++k) {
    const MseSide& d = *sides[k];
    scale[k] = 2.0 * d.weight / (reduction == kMean ? double(d.n) : 1.0);
    if (!write_grad[k]) grad[k] = at::empty({0}, opts);
    else if (!d.evaluated) grad[k] = at::zeros(preds[k]->sizes(), opts);
    else grad[k] = empty_large(preds[k]->sizes(), opts);
    if (reduction != kNone) elem[k] = at::empty({0}, opts);
    else if (!d.evaluated) elem[k] = at::zeros(preds[k]->sizes(), opts);
    else elem[k] = at::empty(preds[k]->sizes(), opts);
  }
  std::vector<double> partial(s.chunks + t.chunks);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sp.scalar_type(), "alpha_weighted_mse_cpu", [&] {
    run_chunks<scalar_t>(sides, grad, scale, elem, partial);
  });
  if (reduction == kNone) return {elem[0], elem[1], grad[0], grad[1]};
  double total = 0.0;
  int64_t c = 0;
  for (int k = 0; k < 2; ++k) {
    const MseSide& d = *sides[k];
    double sum = 0.0;
    for (int64_t i = 0; i < d.chunks; ++i) sum += partial[c++];
    if (!d.evaluated) continue;  // a zero-weight term is not evaluated
    total += d.weight * (reduction == kMean ? sum / double(d.n) : sum);
  }
  return {at::scalar_tensor(total, opts), empty_marker(sp), grad[0], grad[1]};
}

std::tuple<Tensor, Tensor> forward_public(const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                                          const Tensor& alpha, int64_t reduction) {
  auto out = forward(sp, st, tp, tt, alpha, reduction, {false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

// d loss / d pred for each side (the autograd node negates it for the target tensors).
std::tuple<Tensor, Tensor> backward(const std::optional<Tensor>& g0, const std::optional<Tensor>& g1,
                                    const Tensor& sp, const Tensor& st, const Tensor& tp, const Tensor& tt,
                                    const Tensor& alpha, int64_t reduction, std::array<bool, 2> mask) {
  check_mse_args(sp, st, tp, tt, alpha, reduction);
  const double a = cpu_alpha_value(alpha);
  const MseSide s = make_side(sp, st, 1.0 - a), t = make_side(tp, tt, a);
  const std::array<const MseSide*, 2> sides = {&s, &t};
  const std::array<const Tensor*, 2> preds = {&sp, &tp};
  const std::array<const std::optional<Tensor>*, 2> gout = {&g0, &g1};
  const auto opts = sp.options();
  std::array<Tensor, 2> grad, elem = {at::empty({0}, opts), at::empty({0}, opts)};
  std::array<double, 2> scale{};
  std::array<MseSide, 2> run = {s, t};  // sides whose gradient the fused pass still has to write
  for (int k = 0; k < 2; ++k) {
    const MseSide& d = *sides[k];
    const std::optional<Tensor>& go = reduction == kNone ? *gout[k] : g0;
    run[k].evaluated = false;
    if (!mask[k]) {
      grad[k] = at::empty({0}, opts);
    } else if (!d.evaluated || !go.has_value() || !go->defined()) {
      grad[k] = at::zeros(preds[k]->sizes(), opts);
    } else if (reduction == kNone) {
      // per-element grad_output: 2w * g * (x - y), in the accumulation dtype
      const auto acc = acc_type_for(sp.scalar_type());
      Tensor diff = at::sub(preds[k]->to(acc), (k == 0 ? st : tt).to(acc));
      grad[k] = at::mul(at::mul(diff, go->to(acc)), 2.0 * d.weight).to(sp.scalar_type());
    } else {
      grad[k] = empty_large(preds[k]->sizes(), opts);
      scale[k] = go->item<double>() * 2.0 * d.weight / (reduction == kMean ? double(d.n) : 1.0);
      run[k].evaluated = true;
    }
  }
  if (run[0].evaluated || run[1].evaluated) {
    std::array<Tensor, 2> g = {run[0].evaluated ? grad[0] : at::empty({0}, opts),
                               run[1].evaluated ? grad[1] : at::empty({0}, opts)};
    std::vector<double> partial(s.chunks + t.chunks);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, sp.scalar_type(), "alpha_weighted_mse_backward_cpu", [&] {
      run_chunks<scalar_t>({&run[0], &run[1]}, g, scale, elem, partial);
    });
  }
  return {grad[0], grad[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("alpha_weighted_mse", &forward_public);
  m.impl("_alpha_weighted_mse_forward", &forward);
  m.impl("_alpha_weighted_mse_backward", &backward);
}

}  // namespace fastadapt::cpu
