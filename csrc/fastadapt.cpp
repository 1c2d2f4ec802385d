// The Python module fastadapt._C. Importing it loads the operator library: each op's schema is
// registered by csrc/<op>.cpp, its device kernels by csrc/cpu/ and csrc/cuda/, its autograd kernel by
// csrc/autograd/. The module itself carries what the build knew and the controls of the CPU gradient
// cache (csrc/cpu/grad_buffer.h).
#include <Python.h>

#include "cpu/blas.h"
#include "cpu/grad_buffer.h"

#ifndef FASTADAPT_TORCH_VERSION
#define FASTADAPT_TORCH_VERSION "unknown"
#endif
#ifndef FASTADAPT_CUDA_ARCHS
#define FASTADAPT_CUDA_ARCHS ""
#endif

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
  return m;
}
