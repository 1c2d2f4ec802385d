#include "cpu/grad_buffer.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastadapt::cpu {
namespace {

constexpr int64_t kHuge = int64_t(2) << 20;       // 2 MB: one transparent huge page
constexpr int64_t kMinBytes = int64_t(1) << 20;  // see grad_buffer.h

struct Cache {
  std::mutex mu;
  std::multimap<int64_t, void*> idle;  // block bytes -> block
  int64_t idle_bytes = 0;
  int64_t limit = [] {
    const char* v = std::getenv("FASTADAPT_CPU_CACHE_MB");
    return v ? std::atoll(v) * (int64_t(1) << 20) : int64_t(0);  // off unless asked for: see grad_buffer.h
  }();
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: deleters may run during interpreter shutdown
  return *c;
}

// A cached block of at least `bytes` and at most twice that (so batches of varying size reuse
// memory without pinning blocks far larger than they need); `bytes` is updated to the block's size.
void* take(int64_t& bytes) {
  {
    auto& c = cache();
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.idle.lower_bound(bytes);
    if (it != c.idle.end() && it->first <= 2 * bytes) {
      void* p = it->second;
      bytes = it->first;
      c.idle.erase(it);
      c.idle_bytes -= bytes;
      return p;
    }
  }
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHuge, static_cast<size_t>(bytes)) == 0 && p != nullptr,
              "fastadapt: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
  return p;
}

void give_back(void* p, int64_t bytes) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.idle_bytes + bytes <= c.limit) {
      c.idle.emplace(bytes, p);
      c.idle_bytes += bytes;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const int64_t need = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (need < kMinBytes || cache().limit <= 0) return at::empty(sizes, options);
  int64_t bytes = (need + kHuge - 1) / kHuge * kHuge;
  void* p = take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { give_back(q, bytes); }, options);
}

int64_t empty_cache() {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  int64_t freed = c.idle_bytes;
  for (auto& kv : c.idle) std::free(kv.second);
  c.idle.clear();
  c.idle_bytes = 0;
  return freed;
}

std::pair<int64_t, int64_t> cache_stats() {
  auto& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return {c.idle_bytes, static_cast<int64_t>(c.idle.size())};
}

}  // namespace fastadapt::cpu
