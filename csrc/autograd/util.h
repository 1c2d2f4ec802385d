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
