#include "gateway/buffer_pool.hpp"

#include <array>
#include <bit>
#include <cstdlib>
#include <new>
#include <vector>

namespace blockway::gateway {
namespace {

constexpr size_t kMinClassSize = 4096;
constexpr int kClasses = 14;                   // 4 KiB .. 32 MiB
constexpr size_t kMaxCachedBytes = 64u << 20;  // per thread

class Pool {
 public:
  ~Pool() {
    for (auto& list : free_)
      for (auto* p : list) ::operator delete(p, std::align_val_t{kMinClassSize});
  }
  std::byte* take(int cls) {
    auto& list = free_[cls];
    if (!list.empty()) {
      auto* p = list.back();
      list.pop_back();
      cached_ -= class_size(cls);
      return p;
    }
    return static_cast<std::byte*>(::operator new(class_size(cls), std::align_val_t{kMinClassSize}));
  }
  void give(std::byte* p, int cls) {
    if (cached_ + class_size(cls) > kMaxCachedBytes) {
      ::operator delete(p, std::align_val_t{kMinClassSize});
      return;
    }
    free_[cls].push_back(p);
    cached_ += class_size(cls);
  }
  static size_t class_size(int cls) { return kMinClassSize << cls; }

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
    data_ = static_cast<std::byte*>(::operator new(size, std::align_val_t{kMinClassSize}));
    return;
  }
  cls_ = static_cast<uint8_t>(cls);
  data_ = pool().take(cls);
}

void IoBuffer::reset() noexcept {
  if (!data_) return;
  if (cls_ == 0xff)
    ::operator delete(data_, std::align_val_t{kMinClassSize});
  else
    pool().give(data_, cls_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace blockway::gateway
