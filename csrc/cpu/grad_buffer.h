// Allocation of large CPU output buffers (loss gradients) without the page-fault bill.
//
// On the 2-core dev machines touching a freshly mmap'd buffer costs several times what copying it
// does, in page faults (BENCHMARKS.md and shared/ANCHORS.md have the numbers). Whether glibc hands a
// freed multi-MB block back to the next step or returns it to the kernel depends on its dynamic
// mmap/trim thresholds, that is on the heap's history: the same 8 MB gradient measured 2.3 ms or 8 ms
// per step in different processes. So gradients of at least kMinBytes (1 MB) come from a small cache
// of 2 MB-aligned blocks advised MADV_HUGEPAGE: the first touch faults once per 2 MB instead of once
// per 4 KB, and a block freed by one training step is reused by the next without faulting at all
// (best fit, up to twice the requested size, so batches of varying length reuse blocks too). The
// cache holds at most FASTADAPT_CPU_CACHE_MB (default 2048) of idle blocks; fastadapt.empty_cache()
// releases them.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastadapt::cpu {

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the number of bytes released.
int64_t empty_cache();
// (cached idle bytes, cached idle blocks)
std::pair<int64_t, int64_t> cache_stats();

}  // namespace fastadapt::cpu
