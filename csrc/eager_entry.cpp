// The eager entry of fastadapt.linear_relu / FusedLinearReLU.forward.
//
// torch.ops.fastadapt.linear_relu(...) spends ~7 us in Python and in schema-driven argument parsing
// before the dispatcher runs (measured at the MNIST-MLP size: 121 us through torch.ops vs 115 us
// here, on a ~700 us training step). This function unpacks three tensors and calls the same
// dispatcher entry, so autograd, dispatch modes and every device kernel behave exactly as through
// torch.ops. It declines (returns NotImplemented, and the Python caller takes torch.ops) whenever
// Python-level dispatch could apply: a Tensor subclass other than nn.Parameter, an active
// __torch_function__ mode, or arguments that are not tensors. torch.compile never reaches it (the
// Python caller checks is_compiling), so traced graphs still see the registered op.
#include "eager_entry.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "autograd_util.h"

namespace fastadapt {
namespace {

PyTypeObject* parameter_type() {
  static PyTypeObject* type = [] {
    PyObject* mod = PyImport_ImportModule("torch.nn.parameter");
    PyObject* cls = mod ? PyObject_GetAttrString(mod, "Parameter") : nullptr;
    Py_XDECREF(mod);
    PyErr_Clear();
    return reinterpret_cast<PyTypeObject*>(cls);  // kept for the life of the process
  }();
  return type;
}

// A plain tensor or an nn.Parameter (whose __torch_function__ is the disabled default).
bool plain_tensor(PyObject* obj) {
  PyTypeObject* t = Py_TYPE(obj);
  return t == reinterpret_cast<PyTypeObject*>(THPVariableClass) || t == parameter_type();
}

}  // namespace

PyObject* linear_relu_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
  static auto op = op_handle<Sig>("fastadapt::linear_relu");
  if (nargs != 3 || !plain_tensor(args[0]) || !plain_tensor(args[1]) ||
      (args[2] != Py_None && !plain_tensor(args[2])) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& w = THPVariable_Unpack(args[1]);
  std::optional<at::Tensor> b;
  if (args[2] != Py_None) b = THPVariable_Unpack(args[2]);
  // A mixed-device call would dispatch on one tensor's device and skip the other's checks: the
  // Python path words that error.
  if (w.device() != x.device() || (b && b->device() != x.device())) Py_RETURN_NOTIMPLEMENTED;
#ifdef FASTADAPT_WITH_CUDA
  const bool served = x.is_cpu() || x.is_cuda();
#else
  const bool served = x.is_cpu();
#endif
  if (!served) Py_RETURN_NOTIMPLEMENTED;  // the Python path picks the fallback or the meta kernel
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, w, b);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace fastadapt
