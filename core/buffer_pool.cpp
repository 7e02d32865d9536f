#include "core/buffer_pool.hpp"

#include <array>
#include <bit>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include <sys/mman.h>

namespace blockway::core {
namespace {

constexpr size_t kMinClassSize = 4096;
constexpr int kClasses = 14;                   // 4 KiB .. 32 MiB
constexpr size_t kMaxCachedBytes = 64u << 20;  // per thread
constexpr size_t kMaxDepotBytes = 128u << 20;  // shared by all threads

size_t class_size(int cls) { return kMinClassSize << cls; }

// Buffers of a huge page or more are aligned to it and backed by transparent
// huge pages where the kernel allows (madvise mode): the kernel pins a FUSE
// request's receive buffer page by page for every read(), and with one 2 MiB
// folio instead of 512 small pages that pinning all but disappears.
constexpr size_t kHugePage = 2u << 20;

size_t alignment_of(size_t size) { return size >= kHugePage ? kHugePage : kMinClassSize; }

std::byte* allocate(size_t size) {
  auto* p = static_cast<std::byte*>(::operator new(size, std::align_val_t{alignment_of(size)}));
  if (size >= kHugePage) ::madvise(p, size, MADV_HUGEPAGE);  // advice only: failure changes nothing
  return p;
}

void release(std::byte* p, size_t size) { ::operator delete(p, std::align_val_t{alignment_of(size)}); }

// Where a thread's pool sends what it has no room for, and where a pool that
// ran dry looks before allocating. Buffers that one thread allocates and
// another frees (a FUSE write is received on the reader's loop and freed on
// the loop that wrote it) flow back this way: without it the allocating
// thread got fresh memory every time, and the kernel's copy into it paid a
// page fault per 4 KiB (~10% of the daemon's cycles in sequential writes).
// A mutex, taken only on a pool's overflow or miss.
class Depot {
 public:
  ~Depot() {
    for (int cls = 0; cls < kClasses; ++cls)
      for (auto* p : free_[cls]) release(p, class_size(cls));
  }
  std::byte* take(int cls) {
    std::lock_guard lock(mutex_);
    auto& list = free_[cls];
    if (list.empty()) return nullptr;
    auto* p = list.back();
    list.pop_back();
    cached_ -= class_size(cls);
    return p;
  }
  // False when full: the caller frees the buffer.
  bool give(std::byte* p, int cls) {
    std::lock_guard lock(mutex_);
    if (cached_ + class_size(cls) > kMaxDepotBytes) return false;
    free_[cls].push_back(p);
    cached_ += class_size(cls);
    return true;
  }

 private:
  std::mutex mutex_;
  std::array<std::vector<std::byte*>, kClasses> free_;
  size_t cached_ = 0;
};

Depot& depot() {
  static Depot* d = new Depot;  // never destroyed: thread pools may outlive static destruction
  return *d;
}

class Pool {
 public:
  ~Pool() {
    for (int cls = 0; cls < kClasses; ++cls)
      for (auto* p : free_[cls])
        if (!depot().give(p, cls)) release(p, class_size(cls));
  }
  std::byte* take(int cls) {
    auto& list = free_[cls];
    if (!list.empty()) {
      auto* p = list.back();
      list.pop_back();
      cached_ -= class_size(cls);
      return p;
    }
    if (auto* p = depot().take(cls)) return p;
    return allocate(class_size(cls));
  }
  void give(std::byte* p, int cls) {
    if (cached_ + class_size(cls) > kMaxCachedBytes) {
      if (!depot().give(p, cls)) release(p, class_size(cls));
      return;
    }
    free_[cls].push_back(p);
    cached_ += class_size(cls);
  }

 private:
  std::array<std::vector<std::byte*>, kClasses> free_;
  size_t cached_ = 0;
};

Pool& pool() {
  thread_local Pool p;
  return p;
}

int class_of(size_t size) {
  if (size <= kMinClassSize) return 0;
  return std::bit_width((size - 1) / kMinClassSize);
}

}  // namespace

IoBuffer::IoBuffer(size_t size) : size_(size) {
  if (size == 0) return;
  const int cls = class_of(size);
  if (cls >= kClasses) {
    cls_ = 0xff;  // too big to pool
    data_ = allocate(size);
    return;
  }
  cls_ = static_cast<uint8_t>(cls);
  data_ = pool().take(cls);
}

void IoBuffer::reset() noexcept {
  if (!data_) return;
  if (cls_ == 0xff)
    release(data_, size_);
  else
    pool().give(data_, cls_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace blockway::core
