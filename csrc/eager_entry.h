// Python-callable entry points that skip torch.ops' Python layer in eager mode (see eager_entry.cpp).
#pragma once
#include <Python.h>

namespace fastadapt {

// _C.linear_relu_eager(x, weight, bias) -> Tensor, or NotImplemented when the fast entry does not apply.
PyObject* linear_relu_eager(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastadapt
