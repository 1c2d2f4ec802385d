// Shapes, checks and conventions shared by the CPU and CUDA loss kernels and their autograd nodes.
// The Python layer validates first with the same wording; these checks guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace fastadapt {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

inline bool is_supported_float(const at::Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || (d == at::kHalf && t.is_cuda());
}

inline void check_float_input(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t), name,
                   " must be float32, float64 or bfloat16 (float16 on CUDA too), got ", t.scalar_type(),
                   " on ", t.device());
}

inline void check_labels(const char* lname, const at::Tensor& logits, const char* bname, const at::Tensor& labels) {
  check_float_input(lname, logits);
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), bname,
                   " must have an integer dtype, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1, lname, " must have a class dimension (shape (..., C))");
  auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(labels.sizes() == lead, bname, " has shape ", labels.sizes(), " but ", lname, " has shape ",
                    logits.sizes(), "; labels must have the logits' shape without the last (class) dimension");
  TORCH_CHECK_VALUE(logits.size(-1) > 0 || labels.numel() == 0, lname, " has 0 classes");
}

inline void check_same_device(const char* na, const at::Tensor& a, const char* nb, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), nb, " is on ", b.device(), " but ", na, " is on ", a.device(),
                    "; all inputs must share one device");
}

inline void check_alpha(const at::Tensor& alpha, const at::Tensor& like) {
  TORCH_CHECK_VALUE(alpha.numel() == 1 && alpha.dim() <= 1, "alpha must be a 0-dim tensor, got shape ",
                    alpha.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(alpha.scalar_type()), "alpha must be a floating tensor, got ",
                   alpha.scalar_type());
  TORCH_CHECK_VALUE(alpha.is_cpu() || alpha.device() == like.device(), "alpha is on ", alpha.device(),
                    " but the inputs are on ", like.device());
}

// The value of a CPU alpha, validated. A device alpha is validated on the device (see the CUDA kernels).
inline double cpu_alpha_value(const at::Tensor& alpha) {
  double a = alpha.item<double>();
  TORCH_CHECK_VALUE(!std::isnan(a) && a >= 0.0 && a <= 1.0, "alpha must lie in [0, 1], got ", a);
  return a;
}

inline void check_label_smoothing(double eps) {
  TORCH_CHECK_VALUE(!std::isnan(eps) && eps >= 0.0 && eps <= 1.0, "label_smoothing must lie in [0, 1], got ", eps);
}

inline void check_cross_entropy_args(const at::Tensor& sl, const at::Tensor& sy, const at::Tensor& tl,
                                     const at::Tensor& ty, const at::Tensor& alpha, double eps, int64_t reduction) {
  check_labels("source_logits", sl, "source_labels", sy);
  check_labels("target_logits", tl, "target_labels", ty);
  TORCH_CHECK_TYPE(sl.scalar_type() == tl.scalar_type(), "target_logits has dtype ", tl.scalar_type(),
                   " but source_logits has dtype ", sl.scalar_type(), "; they must match");
  check_same_device("source_logits", sl, "source_labels", sy);
  check_same_device("source_logits", sl, "target_logits", tl);
  check_same_device("source_logits", sl, "target_labels", ty);
  check_alpha(alpha, sl);
  check_label_smoothing(eps);
  check_reduction(reduction);
}

inline void check_mse_args(const at::Tensor& sp, const at::Tensor& st, const at::Tensor& tp, const at::Tensor& tt,
                           const at::Tensor& alpha, int64_t reduction) {
  check_float_input("source_pred", sp);
  check_float_input("target_pred", tp);
  TORCH_CHECK_TYPE(st.scalar_type() == sp.scalar_type(), "source_target has dtype ", st.scalar_type(),
                   " but source_pred has dtype ", sp.scalar_type());
  TORCH_CHECK_TYPE(tt.scalar_type() == tp.scalar_type(), "target_target has dtype ", tt.scalar_type(),
                   " but target_pred has dtype ", tp.scalar_type());
  TORCH_CHECK_TYPE(sp.scalar_type() == tp.scalar_type(), "target_pred has dtype ", tp.scalar_type(),
                   " but source_pred has dtype ", sp.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(sp.sizes() == st.sizes(), "source_target has shape ", st.sizes(), " but source_pred has shape ",
                    sp.sizes(), "; shapes must match exactly (fastadapt does not broadcast)");
  TORCH_CHECK_VALUE(tp.sizes() == tt.sizes(), "target_target has shape ", tt.sizes(), " but target_pred has shape ",
                    tp.sizes(), "; shapes must match exactly (fastadapt does not broadcast)");
  check_same_device("source_pred", sp, "source_target", st);
  check_same_device("source_pred", sp, "target_pred", tp);
  check_same_device("source_pred", sp, "target_target", tt);
  check_alpha(alpha, sp);
  check_reduction(reduction);
}

// Accumulation / log-sum-exp dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The second output of a reduced loss op carries no data.
inline at::Tensor empty_marker(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace fastadapt
