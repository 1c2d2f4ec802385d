// Registration helpers shared by the schema files and the device / autograd kernels.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <type_traits>

namespace fastadapt {

// The dispatcher entry of fastadapt::<name>, typed by the C++ declaration in the op's header.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace fastadapt

// m.impl("name", fn) for a kernel that must have the signature csrc/<op>.h declares for
// fastadapt::ops::name: a kernel that drifts from the header fails to compile rather than to load.
#define FASTADAPT_IMPL(m, name, fn)                                                             \
  do {                                                                                          \
    static_assert(std::is_same_v<decltype(fn), decltype(::fastadapt::ops::name)>,               \
                  #fn " must have the signature declared for fastadapt::ops::" #name);          \
    (m).impl(#name, &(fn));                                                                     \
  } while (0)

// The C++ entry of fastadapt::<name>: a call through the dispatcher, typed by the header's declaration.
#define FASTADAPT_OP_HANDLE(name) \
  ::fastadapt::op_handle<decltype(::fastadapt::ops::name)>("fastadapt::" #name)
