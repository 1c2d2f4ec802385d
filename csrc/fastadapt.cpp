// The fastadapt operator library: every schema lives here, in one TORCH_LIBRARY block.
// Device kernels register against these names in csrc/cpu/*.cpp and csrc/cuda/*.cu; the autograd
// kernels (C++ nodes, so a training step pays no Python autograd overhead) in csrc/autograd/*.cpp.
//
// Conventions shared by the loss ops:
//   reduction: 0 = none, 1 = mean, 2 = sum (the values of at::Reduction).
//   alpha: a 0-dim floating tensor on the CPU or on the logits' device, so a schedule can change
//          it without a recompile under torch.compile.
//   The public ops return two tensors. With reduction none they are (source_losses,
//   target_losses), per row and already weighted; otherwise (loss, empty) where empty has 0 elements.
#include <Python.h>
#include <torch/library.h>

#include "cpu/blas.h"
#include "cpu/grad_buffer.h"
#include "eager_entry.h"

#ifndef FASTADAPT_TORCH_VERSION
#define FASTADAPT_TORCH_VERSION "unknown"
#endif
#ifndef FASTADAPT_CUDA_ARCHS
#define FASTADAPT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastadapt, m) {
  // ---- alpha-weighted cross-entropy --------------------------------------------------------
  m.def(
      "alpha_weighted_cross_entropy(Tensor source_logits, Tensor source_labels, Tensor target_logits, "
      "Tensor target_labels, Tensor alpha, int ignore_index=-100, float label_smoothing=0.0, "
      "int reduction=1) -> (Tensor, Tensor)");
  // Forward used under autograd. write_grad[i] asks for side i's gradient for a unit grad_output to be
  // written during the forward pass (the CPU strategy: one read of the logits in all). lse and counts
  // feed the backward op; grads come back with 0 elements when not requested.
  m.def(
      "_alpha_weighted_cross_entropy_forward(Tensor source_logits, Tensor source_labels, "
      "Tensor target_logits, Tensor target_labels, Tensor alpha, int ignore_index, float label_smoothing, "
      "int reduction, bool[2] write_grad) -> (Tensor, Tensor, Tensor source_lse, Tensor target_lse, "
      "Tensor counts, Tensor source_grad, Tensor target_grad)");
  m.def(
      "_alpha_weighted_cross_entropy_backward(Tensor? grad_0, Tensor? grad_1, Tensor source_logits, "
      "Tensor source_labels, Tensor target_logits, Tensor target_labels, Tensor alpha, Tensor source_lse, "
      "Tensor target_lse, Tensor counts, int ignore_index, float label_smoothing, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  // ---- alpha-weighted MSE ------------------------------------------------------------------
  m.def(
      "alpha_weighted_mse(Tensor source_pred, Tensor source_target, Tensor target_pred, "
      "Tensor target_target, Tensor alpha, int reduction=1) -> (Tensor, Tensor)");
  m.def(
      "_alpha_weighted_mse_forward(Tensor source_pred, Tensor source_target, Tensor target_pred, "
      "Tensor target_target, Tensor alpha, int reduction, bool[2] write_grad) -> (Tensor, Tensor, "
      "Tensor source_grad, Tensor target_grad)");
  // Returns d/d pred for each side; d/d target is its negation.
  m.def(
      "_alpha_weighted_mse_backward(Tensor? grad_0, Tensor? grad_1, Tensor source_pred, "
      "Tensor source_target, Tensor target_pred, Tensor target_target, Tensor alpha, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  // ---- fused Linear + ReLU -----------------------------------------------------------------
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // output is relu(x @ weight.T + bias) as saved by the forward; its sign is the ReLU mask.
  // output_mask = (grad_x, grad_weight, grad_bias).
  m.def(
      "_linear_relu_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor output, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// `import fastadapt._C` loads the kernels; the module itself carries what the build knew and the
// CPU gradient-buffer cache controls (csrc/cpu/grad_buffer.h).
static PyObject* py_empty_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fastadapt::cpu::empty_cache());
}
static PyObject* py_cache_stats(PyObject*, PyObject*) {
  auto [bytes, blocks] = fastadapt::cpu::cache_stats();
  return Py_BuildValue("(LL)", static_cast<long long>(bytes), static_cast<long long>(blocks));
}
static PyObject* py_cpu_blas(PyObject*, PyObject*) {
  return PyBool_FromLong(fastadapt::cpu::blas::available<float>() && fastadapt::cpu::blas::available<double>());
}
static PyMethodDef fastadapt_methods[] = {
    {"cpu_blas", py_cpu_blas, METH_NOARGS, "Whether linear_relu's CPU GEMMs call the BLAS directly (csrc/cpu/blas.h)."},
    {"linear_relu_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fastadapt::linear_relu_eager)),
     METH_FASTCALL, "linear_relu(x, weight, bias) through the dispatcher, or NotImplemented (see eager_entry.cpp)."},
    {"empty_cache", py_empty_cache, METH_NOARGS, "Release idle CPU gradient buffers; returns the bytes freed."},
    {"cache_stats", py_cache_stats, METH_NOARGS, "(idle bytes, idle blocks) held by the CPU gradient cache."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fastadapt_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastadapt_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastadapt_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FASTADAPT_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", FASTADAPT_CUDA_ARCHS);
#ifdef FASTADAPT_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddIntConstant(m, "with_cpu", 1);
  return m;
}
