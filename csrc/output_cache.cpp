// The cache of big output blocks (output_cache.h). Built once, for the baseline ISA: every
// copy of the kernels takes its outputs from this one instance.
#include "output_cache.h"

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

namespace attnkern {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // smaller outputs: at::empty_like
constexpr size_t kGranule = size_t(64) << 10;       // block capacities are multiples of this
constexpr int64_t kDefaultLimitMB = 512;
constexpr const char* kLimitVariable = "ATTNKERN_CPU_OUTPUT_CACHE_MB";

struct Block {
  void* ptr;
  size_t capacity;
};

class OutputBlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    ensure_limit_read();
    const size_t capacity = (std::max(n, size_t(1)) + kGranule - 1) / kGranule * kGranule;
    Block* taken = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // best fit among blocks at most 1/8 larger than asked, so no block is wasted on a much
      // smaller output
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t c = free_[i].capacity;
        if (c >= capacity && c <= capacity + capacity / 8 && (best == free_.size() || c < free_[best].capacity))
          best = i;
      }
      if (best < free_.size()) {
        taken = new Block(free_[best]);
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_bytes_ -= taken->capacity;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (taken == nullptr) taken = new Block{c10::alloc_cpu(capacity), capacity};
    return {taken->ptr, taken, &OutputBlockCache::release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // {hits, misses, idle bytes held, idle blocks held, limit in bytes}
  std::vector<int64_t> stats() {
    ensure_limit_read();
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(limit_bytes_)};
  }

  // Frees every idle block; returns the bytes freed.
  int64_t empty() {
    std::vector<Block> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(free_);
      cached_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& b : freed) {
      bytes += static_cast<int64_t>(b.capacity);
      c10::free_cpu(b.ptr);
    }
    return bytes;
  }

  // Sets the limit (MB; 0 turns the cache off) and returns the one before; idle blocks above
  // the new limit are freed, oldest first.
  int64_t set_limit_mb(int64_t mb) {
    TORCH_CHECK(mb >= 0, "attnkern: the CPU output cache limit must be >= 0 MB, got ", mb);
    ensure_limit_read();
    std::vector<Block> evicted;
    int64_t before;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      before = static_cast<int64_t>(limit_bytes_ >> 20);
      limit_bytes_ = static_cast<size_t>(mb) << 20;
      evict_to(limit_bytes_, evicted);
    }
    for (const Block& b : evicted) c10::free_cpu(b.ptr);
    return before;
  }

  void reset_after_fork() {  // the parent's other threads may have held the lock at fork
    new (&mutex_) std::mutex();
  }

 private:
  static void release_block(void* ctx) { instance().release(static_cast<Block*>(ctx)); }

  void release(Block* block) {
    const Block b = *block;
    delete block;
    std::vector<Block> evicted;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b.capacity >= kMinCachedBytes && b.capacity <= limit_bytes_) {
        evict_to(limit_bytes_ - b.capacity, evicted);
        free_.push_back(b);
        cached_bytes_ += b.capacity;
        keep = true;
      }
    }
    for (const Block& e : evicted) c10::free_cpu(e.ptr);
    if (!keep) c10::free_cpu(b.ptr);
  }

  // Moves the oldest idle blocks into `evicted` until at most `bytes` stay (lock held).
  void evict_to(size_t bytes, std::vector<Block>& evicted) {
    size_t n = 0;
    while (n < free_.size() && cached_bytes_ > bytes) {
      cached_bytes_ -= free_[n].capacity;
      evicted.push_back(free_[n++]);
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(n));
  }

  void ensure_limit_read() {
    std::call_once(limit_read_, [this] {
      int64_t mb = kDefaultLimitMB;
      if (const char* v = std::getenv(kLimitVariable); v != nullptr && *v != '\0') {
        char* end = nullptr;
        const long long parsed = std::strtoll(v, &end, 10);
        TORCH_CHECK(end != v && *end == '\0' && parsed >= 0 && parsed < (int64_t(1) << 40), kLimitVariable,
                    " must be a whole number of MB, 0 or more (0 turns the cache off), got '", v, "'");
        mb = parsed;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_ = static_cast<size_t>(mb) << 20;
    });
  }

 public:
  static OutputBlockCache& instance() {
    // never destroyed: tensors freed at interpreter exit, after static destructors, still
    // return their blocks here
    static OutputBlockCache* cache = [] {
      auto* c = new OutputBlockCache();
      pthread_atfork(nullptr, nullptr, [] { instance().reset_after_fork(); });
      return c;
    }();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::once_flag limit_read_;
  std::vector<Block> free_;  // idle blocks, oldest first
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = static_cast<size_t>(kDefaultLimitMB) << 20;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output_like(const at::Tensor& x) {
  const size_t nbytes = static_cast<size_t>(x.numel()) * x.element_size();
  if (nbytes < kMinCachedBytes) return at::empty_like(x);
  return at::Tensor(at::detail::empty_strided_generic(x.sizes(), x.strides(), &OutputBlockCache::instance(),
                                                       c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                       x.scalar_type()));
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("_output_cache_stats() -> int[]",
        []() { return attnkern::cpu::OutputBlockCache::instance().stats(); });
  m.def("_empty_output_cache() -> int", []() { return attnkern::cpu::OutputBlockCache::instance().empty(); });
  m.def("_set_output_cache_limit_mb(int mb) -> int",
        [](int64_t mb) { return attnkern::cpu::OutputBlockCache::instance().set_limit_mb(mb); });
}
