// Allocation of large CPU output buffers (loss gradients), with an opt-in cache.
//
// On the 2-core dev machines touching a freshly mmap'd buffer costs several times what copying it
// does, in page faults (BENCHMARKS.md and shared/ANCHORS.md have the numbers). Whether glibc hands a
// freed multi-MB block back to the next step or returns it to the kernel depends on its dynamic
// mmap/trim thresholds, that is on the heap's history: the same 8 MB gradient measured 2.3 ms or 8 ms
// per step in different processes. With FASTADAPT_CPU_CACHE_MB=N (N > 0), gradients of at least
// kMinBytes (1 MB) come from a cache of 2 MB-aligned blocks advised MADV_HUGEPAGE: the first touch
// faults once per 2 MB instead of once per 4 KB, and a block freed by one training step is reused by
// the next without faulting at all (best fit, up to twice the requested size, so batches of varying
// length reuse blocks too). The cache holds at most N MB of idle blocks; fastadapt.empty_cache()
// releases them.
//
// Off by default (N = 0: every gradient is a plain at::empty, its memory back to the allocator when
// autograd frees it). In whole training steps (benchmarks/bench_train_step_cache.py; BENCHMARKS.md has
// the table) the cache made steps dominated by a large-vocabulary loss faster, but kept one step's
// loss gradients resident between steps and raised the step's peak memory above eager's, because
// the idle blocks cannot serve the step's other allocations. Peak memory is what a training run
// runs out of, so the speed is opt-in.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastadapt::cpu {

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the number of bytes released.
int64_t empty_cache();
// (cached idle bytes, cached idle blocks)
std::pair<int64_t, int64_t> cache_stats();

}  // namespace fastadapt::cpu
