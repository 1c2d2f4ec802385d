// Allocation of large CPU output buffers (loss gradients) without the page-fault bill.
//
// On the 2-core dev machines touching a freshly mmap'd buffer of a few hundred MB costs several times
// what copying it does, in page faults (BENCHMARKS.md and shared/ANCHORS.md have the numbers), and
// glibc returns every block that large to the kernel on free. So gradients of at least kMinBytes come from a small cache of 2 MB-aligned blocks advised
// MADV_HUGEPAGE: the first touch faults once per 2 MB instead of once per 4 KB, and a block freed by
// one training step is reused by the next without faulting at all (best fit, up to twice the
// requested size, so batches of varying length reuse blocks too). The cache holds at most
// FASTADAPT_CPU_CACHE_MB (default 2048) of idle blocks; fastadapt.empty_cache() releases them.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastadapt::cpu {

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the number of bytes released.
int64_t empty_cache();
// (cached idle bytes, cached idle blocks)
std::pair<int64_t, int64_t> cache_stats();

}  // namespace fastadapt::cpu
