// Helpers shared by the C++ autograd nodes.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>

namespace fastadapt {

// True while torch.compile / opcheck traces (fake or functional tensors): a node must then stay
// functional and must not read tensor values.
inline bool is_traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize, c10::DispatchKey::PythonTLSSnapshot}));
}

// Whether a gradient the forward wrote (and rounded) for a unit grad_output can serve this grad_output:
// scaling it rounds a second time, which float32 and float64 absorb and bfloat16/float16 do not, so a
// low-precision gradient serves only an exact 1 (the usual loss.backward()); anything else is
// recomputed from the inputs. Traced (torch.compile), values cannot be read: low precision recomputes.
inline bool saved_grad_serves(const at::Tensor& grad, const at::Tensor& grad_output) {
  const auto t = grad.scalar_type();
  if (t == at::kFloat || t == at::kDouble) return true;
  if (is_traced(grad) || is_traced(grad_output) || !grad_output.is_cpu() || grad_output.numel() != 1) return false;
  return grad_output.item<double>() == 1.0;
}

// grad * grad_output for a gradient the forward already wrote for a unit grad_output. A unit
// grad_output (the usual loss.backward()) costs nothing in eager mode on the CPU; anything else is out
// of place, because with retain_graph=True the saved gradient is handed out again. Traced, it stays
// functional and reads no values.
inline at::Tensor scale_saved_grad(const at::Tensor& grad, const at::Tensor& grad_output) {
  if (is_traced(grad) || is_traced(grad_output) || !grad_output.is_cpu() || grad_output.numel() != 1) {
    return grad.mul(grad_output);
  }
  if (grad.numel() == 0 || grad_output.item<double>() == 1.0) return grad;
  return grad.mul(grad_output);
}

}  // namespace fastadapt
