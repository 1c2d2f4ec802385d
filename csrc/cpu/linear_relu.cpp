// CPU kernels of the fused Linear + ReLU: y = relu(x @ W^T + b).
//
// Forward: the GEMM (BLAS through at::mm_out) writes straight into the output; one vectorised,
// parallel pass then adds the bias and clamps in place. Reads x and W once (in the GEMM) and touches
// y twice; the only allocation is y itself. eager nn.Linear + ReLU instead broadcasts the bias into
// its output first, then allocates and writes a second tensor for the ReLU.
//
// Backward: one pass reads grad_output and the saved output y (y > 0 is the ReLU mask, so the
// pre-activation is never kept), writes the masked gradient gm and, in the same pass, the bias
// gradient. Then grad_x = gm @ W and grad_W = gm^T @ x. The bias sum runs over fixed blocks of rows
// whose partial sums are added in block order: bitwise identical results for any thread count and no
// float atomics. bf16 accumulates in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

namespace fastadapt::cpu {
namespace {

using at::Tensor;

// Rows per bias-gradient block. Fixed (not derived from the thread count) so the summation order,
// hence the rounding, never changes; the partial-sum buffer is 1/kBlockRows of the output.
constexpr int64_t kBlockRows = 64;
// Elements per parallel task: below this one thread does the whole pass (a batch-64 MLP layer).
constexpr int64_t kGrainElems = int64_t(1) << 15;

bool supported_float(const Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || (d == at::kHalf && t.is_cuda());
}

// Python's spelling of dtypes and shapes, so a direct torch.ops call fails with the very message of
// the Python API (fastadapt/linear_relu.py).
std::string py_dtype(at::ScalarType s) {
  return "torch." + std::string(c10::getDtypeNames(s).first);
}

std::string py_shape(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

void check_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK_TYPE(supported_float(x), "linear_relu: x must be a floating tensor (float32, float64, bfloat16",
                   x.is_cuda() ? ", float16" : "", " on ", c10::DeviceTypeName(x.device().type(), true),
                   "), got dtype ", py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(weight.dim() == 2, "linear_relu: weight must be 2-D (out_features, in_features), got shape ",
                    py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "linear_relu: x must have shape (..., in_features), got a 0-dim tensor");
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "linear_relu: x.shape[-1] is ", x.size(-1),
                    " but weight has in_features=", weight.size(1), " (weight shape ", py_shape(weight.sizes()), ")");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear_relu: bias must have shape (",
                      weight.size(0), ",) = (out_features,), got shape ", py_shape(bias->sizes()));
  }
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "linear_relu: weight has dtype ",
                   py_dtype(weight.scalar_type()), " but x has dtype ", py_dtype(x.scalar_type()), "; they must match");
  if (has_bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "linear_relu: bias has dtype ",
                     py_dtype(bias->scalar_type()), " but x has dtype ", py_dtype(x.scalar_type()),
                     "; they must match");
  }
  TORCH_CHECK_VALUE(weight.device() == x.device(), "linear_relu: weight is on ", weight.device(), " but x is on ",
                    x.device(), "; all inputs must share one device");
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->device() == x.device(), "linear_relu: bias is on ", bias->device(), " but x is on ",
                      x.device(), "; all inputs must share one device");
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

// ---- row kernels -----------------------------------------------------------------------------
// Plain loops that the compiler vectorises, built three times (AVX-512, AVX2, baseline) and picked
// once at load time by target_clones. at::vec is no help in this file: without ATen's per-capability
// build (CPU_CAPABILITY_*) it falls back to its generic Vectorized, which measured 3-6x slower here
// than ATen's own threshold_backward. The bodies are inline templates so each clone gets its own ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTADAPT_CLONES
#endif

template <typename T>
inline float to_acc(T v) { return float(v); }
inline double to_acc(double v) { return v; }

// row = max(row + b, 0) (b may be null); NaN stays NaN as in torch.relu. bf16 adds in fp32, rounds once.
template <typename T>
C10_ALWAYS_INLINE void bias_relu_row_impl(T* __restrict row, const T* __restrict b, int64_t n) {
  if (b) {
    for (int64_t c = 0; c < n; ++c) {
      auto v = to_acc(row[c]) + to_acc(b[c]);
      row[c] = T(v < 0 ? decltype(v)(0) : v);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      auto v = to_acc(row[c]);
      row[c] = T(v < 0 ? decltype(v)(0) : v);
    }
  }
}
FASTADAPT_CLONES void bias_relu_row(float* row, const float* b, int64_t n) { bias_relu_row_impl(row, b, n); }
FASTADAPT_CLONES void bias_relu_row(double* row, const double* b, int64_t n) { bias_relu_row_impl(row, b, n); }
FASTADAPT_CLONES void bias_relu_row(at::BFloat16* row, const at::BFloat16* b, int64_t n) {
  bias_relu_row_impl(row, b, n);
}

// gm = g * (y > 0); acc += gm (acc may be null). Selecting keeps gm exact in bf16; only acc is wider.
template <typename T, typename A>
C10_ALWAYS_INLINE void mask_row_impl(const T* __restrict g, const T* __restrict y, T* __restrict gm,
                                     A* __restrict acc, int64_t n) {
  if (acc) {
    for (int64_t c = 0; c < n; ++c) {
      const A m = to_acc(y[c]) > A(0) ? to_acc(g[c]) : A(0);
      gm[c] = T(m);
      acc[c] += m;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) gm[c] = to_acc(y[c]) > 0 ? g[c] : T(0);
  }
}
FASTADAPT_CLONES void mask_row(const float* g, const float* y, float* gm, float* acc, int64_t n) {
  mask_row_impl(g, y, gm, acc, n);
}
FASTADAPT_CLONES void mask_row(const double* g, const double* y, double* gm, double* acc, int64_t n) {
  mask_row_impl(g, y, gm, acc, n);
}
FASTADAPT_CLONES void mask_row(const at::BFloat16* g, const at::BFloat16* y, at::BFloat16* gm, float* acc,
                               int64_t n) {
  mask_row_impl(g, y, gm, acc, n);
}

// y[r, :] = max(y[r, :] + b, 0) in place over all rows; b may be null.
template <typename scalar_t>
void bias_relu_rows(scalar_t* y, const scalar_t* b, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) bias_relu_row(y + r * n, b, n);
  });
}

Tensor linear_relu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_args(x, weight, bias);
  const int64_t out_f = weight.size(0);
  const Tensor x2 = as_rows(x);
  Tensor y = at::empty({x2.size(0), out_f}, x.options());
  at::mm_out(y, x2, weight.t());
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();  // (out,) is contiguous in practice: no copy
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_relu_cpu", [&] {
    bias_relu_rows<scalar_t>(y.data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr, y.size(0),
                             out_f);
  });
  return x.dim() == 2 ? y : y.view(with_last(x.sizes(), out_f));
}

// gm = g * (y > 0) and, when bias_grad is given, bias_grad = column sums of gm (in acc_t).
// g may be strided (an expanded grad_output has a row stride of 0); gm and y are row-major.
template <typename scalar_t>
void mask_and_bias_grad(const scalar_t* g, int64_t g_rs, int64_t g_cs, const scalar_t* y, scalar_t* gm, int64_t rows,
                        int64_t n, scalar_t* bias_grad) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t nblocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<acc_t> partial(bias_grad ? nblocks * n : 0);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n * kBlockRows, 1));
  at::parallel_for(0, nblocks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* acc = bias_grad ? partial.data() + k * n : nullptr;
      if (acc) std::fill(acc, acc + n, acc_t(0));
      const int64_t r_end = std::min(rows, (k + 1) * kBlockRows);
      for (int64_t r = k * kBlockRows; r < r_end; ++r) {
        const scalar_t* grow = g + r * g_rs;
        const scalar_t* yrow = y + r * n;
        scalar_t* mrow = gm + r * n;
        if (g_cs == 1) {
          mask_row(grow, yrow, mrow, acc, n);
          continue;
        }
        for (int64_t c = 0; c < n; ++c) {  // a column-strided grad_output: rare, kept simple
          const scalar_t gv = yrow[c] > scalar_t(0) ? grow[c * g_cs] : scalar_t(0);
          mrow[c] = gv;
          if (acc) acc[c] += acc_t(gv);
        }
      }
    }
  });
  if (!bias_grad) return;
  // Blocks are added in index order for every column: the order depends on rows only.
  at::parallel_for(0, n, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(nblocks, 1)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t s = 0;
      for (int64_t k = 0; k < nblocks; ++k) s += partial[k * n + c];
      bias_grad[c] = scalar_t(s);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_output, const Tensor& x,
                                                        const Tensor& weight, const Tensor& output,
                                                        std::array<bool, 3> mask) {
  check_args(x, weight, std::nullopt);
  const int64_t out_f = weight.size(0);
  const int64_t rows = leading_rows(x);
  const auto lead = with_last(x.sizes(), out_f);
  TORCH_CHECK_VALUE(output.sizes() == c10::IntArrayRef(lead), "_linear_relu_backward: output has shape ",
                    py_shape(output.sizes()), ", expected ", py_shape(lead));
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), "_linear_relu_backward: grad_output has shape ",
                    py_shape(grad_output.sizes()), " but output has shape ", py_shape(output.sizes()));
  TORCH_CHECK_TYPE(grad_output.scalar_type() == x.scalar_type() && output.scalar_type() == x.scalar_type(),
                   "_linear_relu_backward: grad_output (", py_dtype(grad_output.scalar_type()), ") and output (",
                   py_dtype(output.scalar_type()), ") must have x's dtype ", py_dtype(x.scalar_type()));
  Tensor gx = mask[0] ? Tensor() : at::empty({0}, x.options());
  Tensor gw = mask[1] ? Tensor() : at::empty({0}, weight.options());
  Tensor gb = mask[2] ? at::empty({out_f}, weight.options()) : at::empty({0}, weight.options());
  if (!mask[0] && !mask[1] && !mask[2]) return {gx, gw, gb};

  // grad_output as (rows, out) with its own strides; only a layout no 2-D view can describe is copied.
  Tensor g2 = grad_output.dim() == 2 ? grad_output : grad_output.reshape({rows, out_f});
  const Tensor y2 = output.reshape({rows, out_f}).contiguous();  // saved by our forward: already contiguous
  Tensor gm = at::empty({rows, out_f}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_relu_backward_cpu", [&] {
    mask_and_bias_grad<scalar_t>(g2.const_data_ptr<scalar_t>(), g2.stride(0), g2.stride(1),
                                 y2.const_data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), rows, out_f,
                                 mask[2] ? gb.data_ptr<scalar_t>() : nullptr);
  });
  if (mask[0]) {
    gx = at::mm(gm, weight);
    if (x.dim() != 2) gx = gx.view(x.sizes());
  }
  if (mask[1]) gw = at::mm(gm.t(), as_rows(x));
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("linear_relu", &linear_relu);
  m.impl("_linear_relu_backward", &linear_relu_backward);
}

}  // namespace fastadapt::cpu
