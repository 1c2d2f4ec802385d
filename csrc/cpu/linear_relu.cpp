// CPU kernels of the fused Linear + ReLU: y = relu(x @ W^T + b).
//
// Forward: the features are cut into one slice per thread (edges on multiples of 16); each thread
// runs the BLAS GEMM for its slice of y on its own (blas.h: the library ATen uses, called directly)
// and then adds the bias and clamps that slice in place while it is still in its cache. Reads x and
// W once and touches y twice; the only allocation is y itself. Eager nn.Linear + ReLU instead
// broadcasts the bias into its output first, then allocates and writes a second tensor for the ReLU.
//
// Backward: per feature slice, one pass reads grad_output and the saved output y (y > 0 is the ReLU
// mask, so the pre-activation is never kept) and writes the masked gradient gm and the bias gradient;
// the same thread then computes its rows of grad_W = gm^T @ x. grad_x = gm @ W follows, sliced over
// rows of x. grad_W comes out in the weight's own layout, so autograd stores it without the
// transpose copy eager's addmm backward costs. The bias sum runs over fixed blocks of rows whose
// partial sums are added in block order: bitwise identical for any thread count, no float atomics.
// bf16 takes its GEMMs from ATen (oneDNN), with the bias inside the forward GEMM so that product and
// bias round once, and accumulates the bias gradient in fp32; so do shapes beyond 32-bit BLAS.
// The row epilogues are built per CPU capability (cpu/row_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/blas.h"
#include "cpu/row_kernels.h"
#include "linear_relu.h"
#include "register.h"

namespace fastadapt::cpu {
namespace {

using at::Tensor;

// Rows per bias-gradient block. Fixed (not derived from the thread count) so the summation order,
// hence the rounding, never changes; the partial-sum buffer is 1/kBiasBlockRows of the output.
constexpr int64_t kBiasBlockRows = 64;

// The shapes the kernels index with; user-facing checks are fastadapt/ops/linear_relu.py's.
void check_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), "linear_relu: x (..., in) and weight (out, in) do not match");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), "linear_relu: weight must have x's dtype and device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "linear_relu: bias must be (out,) with x's dtype and device");
  }
}

int64_t leading_rows(const Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// x as (rows, in_features) without a copy whenever the strides allow it (BLAS takes any 2-D layout).
Tensor as_rows(const Tensor& x) {
  return x.dim() == 2 ? x : x.reshape({leading_rows(x), x.size(-1)});
}

std::vector<int64_t> with_last(c10::IntArrayRef lead_and_last, int64_t last) {
  std::vector<int64_t> s(lead_and_last.begin(), lead_and_last.end());
  s.back() = last;
  return s;
}

// ---- work split --------------------------------------------------------------------------------
// Below this many multiply-adds one thread does a whole call: waking the pool costs more than it saves.
constexpr int64_t kSerialMacs = int64_t(1) << 19;

// The work over_slices weighs an elementwise pass over `elems` elements at: such a pass goes
// parallel from 2^15 elements (a batch-64 MLP layer's 8192 stay on one thread).
constexpr int64_t elementwise_macs(int64_t elems) { return elems * (kSerialMacs >> 15); }

// Runs f(c0, c1) over slices [c0, c1) of n rows or columns, one slice per thread, slice edges on
// multiples of 16 (one AVX-512 register of floats, so no slice splits a BLAS micro-tile). Each slice's
// BLAS call then runs single-threaded inside the parallel region: at the MNIST-MLP layer this beat one
// call threaded by the BLAS itself (BENCHMARKS.md, issue 3), and the slice's epilogue runs on the
// thread whose cache holds it.
template <typename F>
void over_slices(int64_t n, int64_t macs, const F& f) {
  const int64_t units = (n + 15) / 16;
  const int64_t slices = macs < kSerialMacs ? 1 : std::min<int64_t>(at::get_num_threads(), units);
  if (slices <= 1) {
    f(0, n);  // outside a parallel region, so a large call still gets the BLAS's own threads
    return;
  }
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c0 = std::min(n, units * s / slices * 16), c1 = std::min(n, units * (s + 1) / slices * 16);
      if (c0 < c1) f(c0, c1);
    }
  });
}

// The BLAS path takes a row-major matrix with unit column stride; anything else is copied once, as
// at::mm would copy it.
Tensor row_major(const Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1)) ? t : t.contiguous();
}

// Whether x2 @ weight^T and its gradients take the direct BLAS path (blas.h): float and double with
// every size and leading dimension in 1..INT_MAX; bf16 (oneDNN's GEMM), empty and >2^31 shapes keep at::mm.
template <typename scalar_t>
bool use_blas(const Tensor& x2, const Tensor& weight) {
  if constexpr (blas::supported<scalar_t>) {
    if (!blas::available<scalar_t>()) return false;
    for (int64_t d : {x2.size(0), x2.size(1), weight.size(0), x2.stride(0), weight.stride(0)})
      if (d <= 0 || !blas::fits_int(d)) return false;
    return true;
  }
  return false;
}

// blas::gemm for the types that have one; use_blas() is false for the others, so this never runs them.
template <typename scalar_t>
void blas_gemm(int64_t m, int64_t n, int64_t k, blas::Operand<scalar_t> a, blas::Operand<scalar_t> b, scalar_t* c,
               int64_t ldc) {
  if constexpr (blas::supported<scalar_t>) blas::gemm<scalar_t>(m, n, k, a, b, c, ldc);
}

// y[:, c0:c1] = max(y[:, c0:c1] + b[c0:c1], 0) in place; b may be null.
template <typename scalar_t>
void bias_relu_cols(scalar_t* y, int64_t ldy, const scalar_t* b, int64_t rows, int64_t c0, int64_t c1) {
  const auto& f = dense_row_fns<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) f.bias_relu(y + r * ldy + c0, b ? b + c0 : nullptr, c1 - c0);
}

// bias: (out,) contiguous, or undefined.
template <typename scalar_t>
void linear_relu_kernel(const Tensor& x2, const Tensor& weight, const Tensor& bias, Tensor& y) {
  const int64_t rows = x2.size(0), in_f = x2.size(1), out_f = weight.size(0);
  scalar_t* yp = y.data_ptr<scalar_t>();
  if (use_blas<scalar_t>(x2, weight)) {
    const Tensor xr = row_major(x2), wr = row_major(weight);
    const blas::Operand<scalar_t> xa{xr.const_data_ptr<scalar_t>(), xr.stride(0), false};
    const scalar_t* wp = wr.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    // Each thread computes y[:, c0:c1] = x @ W[c0:c1]^T, then adds the bias and clamps that slice.
    over_slices(out_f, rows * in_f * out_f, [&](int64_t c0, int64_t c1) {
      blas_gemm<scalar_t>(rows, c1 - c0, in_f, xa, {wp + c0 * wr.stride(0), wr.stride(0), true}, yp + c0, out_f);
      bias_relu_cols(yp, out_f, b, rows, c0, c1);
    });
    return;
  }
  // ATen's GEMM (bf16, empty and >2^31 shapes). The bias goes into it, as nn.Linear's addmm does, so
  // a bf16 product and bias are added in fp32 and rounded once; the pass after it only clamps.
  if (bias.defined()) {
    at::addmm_out(y, bias, x2, weight.t());
  } else {
    at::mm_out(y, x2, weight.t());
  }
  over_slices(out_f, elementwise_macs(rows * out_f),
              [&](int64_t c0, int64_t c1) { bias_relu_cols<scalar_t>(yp, out_f, nullptr, rows, c0, c1); });
}

Tensor linear_relu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_args(x, weight, bias);
  const int64_t out_f = weight.size(0);
  const Tensor x2 = as_rows(x);
  Tensor y = at::empty({x2.size(0), out_f}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();  // (out,) is contiguous in practice: no copy
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_relu_cpu",
                                 [&] { linear_relu_kernel<scalar_t>(x2, weight, b, y); });
  return x.dim() == 2 ? y : y.view(with_last(x.sizes(), out_f));
}

// For columns [c0, c1): gm = g * (y > 0) and, when bias_grad is given, bias_grad = column sums of gm.
// Rows are summed in fixed blocks of kBiasBlockRows whose partial sums are added in block order, so the
// rounding depends on the row count only, never on the thread count or the column slicing.
// g has unit column stride and row stride g_rs (0 for a broadcast row); gm and y are row-major, ld n.
template <typename scalar_t>
void mask_and_bias_grad_cols(const scalar_t* g, int64_t g_rs, const scalar_t* y, scalar_t* gm, int64_t rows,
                             int64_t n, int64_t c0, int64_t c1, scalar_t* bias_grad) {
  using A = acc_t<scalar_t>;
  const auto& f = dense_row_fns<scalar_t>();
  const int64_t w = c1 - c0;
  std::vector<A> total(bias_grad ? w : 0), block(bias_grad ? w : 0);
  for (int64_t r0 = 0; r0 < rows; r0 += kBiasBlockRows) {
    A* acc = bias_grad ? block.data() : nullptr;
    if (acc) std::fill(block.begin(), block.end(), A(0));
    for (int64_t r = r0; r < std::min(rows, r0 + kBiasBlockRows); ++r)
      f.relu_mask(g + r * g_rs + c0, y + r * n + c0, gm + r * n + c0, acc, w);
    for (int64_t c = 0; acc && c < w; ++c) total[c] += block[c];
  }
  for (int64_t c = 0; bias_grad && c < w; ++c) bias_grad[c0 + c] = scalar_t(total[c]);
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_output, const Tensor& x,
                                                        const Tensor& weight, const Tensor& output,
                                                        std::array<bool, 3> mask) {
  check_args(x, weight, std::nullopt);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const int64_t rows = leading_rows(x);
  const auto lead = with_last(x.sizes(), out_f);
  TORCH_CHECK(output.sizes() == c10::IntArrayRef(lead) && grad_output.sizes() == output.sizes() &&
                  grad_output.scalar_type() == x.scalar_type() && output.scalar_type() == x.scalar_type(),
              "_linear_relu_backward: grad_output and output must be (..., out) with x's dtype");
  Tensor gx = mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor gw = mask[1] ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  Tensor gb = mask[2] ? at::empty({out_f}, weight.options()) : at::empty({0}, weight.options());
  if (!mask[0] && !mask[1] && !mask[2]) return {gx, gw, gb};

  // grad_output as (rows, out). The mask pass reads rows with unit stride (a row stride of 0, one
  // broadcast row, is fine); any other layout is copied once, output-sized. That includes the all-zero
  // strides of the gradient of sum(), which read element by element cost far more than the copy.
  Tensor g2 = grad_output.dim() == 2 ? grad_output : grad_output.reshape({rows, out_f});
  if (g2.stride(1) != 1 && out_f > 1) g2 = g2.contiguous();
  const Tensor y2 = output.reshape({rows, out_f}).contiguous();  // saved by our forward: already contiguous
  Tensor gm = at::empty({rows, out_f}, x.options());
  const Tensor x2 = as_rows(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_relu_backward_cpu", [&] {
    const scalar_t* gp = g2.const_data_ptr<scalar_t>();
    const scalar_t* yp = y2.const_data_ptr<scalar_t>();
    scalar_t* gmp = gm.data_ptr<scalar_t>();
    scalar_t* gbp = mask[2] ? gb.data_ptr<scalar_t>() : nullptr;
    const bool blas_ok = use_blas<scalar_t>(x2, weight);
    const Tensor xr = blas_ok && mask[1] ? row_major(x2) : x2;
    // One pass per column slice: mask and bias gradient of the slice, then, still on the same thread
    // and with the slice in cache, grad_W[c0:c1] = gm[:, c0:c1]^T @ x.
    // Without a BLAS slice to follow, the mask pass alone is sliced like an elementwise pass.
    const int64_t macs = blas_ok && mask[1] ? rows * in_f * out_f : elementwise_macs(rows * out_f);
    over_slices(out_f, macs, [&](int64_t c0, int64_t c1) {
      mask_and_bias_grad_cols<scalar_t>(gp, g2.stride(0), yp, gmp, rows, out_f, c0, c1, gbp);
      if (blas_ok && mask[1]) {
        blas_gemm<scalar_t>(c1 - c0, in_f, rows, {gmp + c0, out_f, true}, {xr.const_data_ptr<scalar_t>(), xr.stride(0), false},
                             gw.data_ptr<scalar_t>() + c0 * in_f, in_f);
      }
    });
    if (mask[1] && !blas_ok) at::mm_out(gw, gm.t(), x2);
    if (mask[0]) {
      Tensor gx2 = gx.view({rows, in_f});
      if (blas_ok) {
        const Tensor wr = row_major(weight);
        // grad_x[r0:r1] = gm[r0:r1] @ W, a slice of rows per thread: faster at the large layer than
        // slices of input features or one BLAS-threaded call (BENCHMARKS.md, issue 3).
        over_slices(rows, rows * in_f * out_f, [&](int64_t r0, int64_t r1) {
          blas_gemm<scalar_t>(r1 - r0, in_f, out_f, {gmp + r0 * out_f, out_f, false},
                              {wr.const_data_ptr<scalar_t>(), wr.stride(0), false}, gx2.data_ptr<scalar_t>() + r0 * in_f,
                              in_f);
        });
      } else {
        at::mm_out(gx2, gm, weight);
      }
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  FASTADAPT_IMPL(m, linear_relu, linear_relu);
  FASTADAPT_IMPL(m, _linear_relu_backward, linear_relu_backward);
}

}  // namespace fastadapt::cpu
