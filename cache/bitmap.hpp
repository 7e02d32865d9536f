// AtomicBitmap: one bit per chunk (or region), readable and writable from
// any thread without locks.
//
// Thread model: every bit operation is a single atomic RMW on its 64-bit
// word (relaxed for tests on the hot path, acq_rel for changes), so
// concurrent set/clear of different bits never lose each other. Scans see a
// consistent word at a time, not a consistent whole.
#pragma once

#include <atomic>
#include <bit>
#include <cstdint>
#include <memory>
#include <vector>

namespace blockway::cache {

class AtomicBitmap {
 public:
  AtomicBitmap() = default;
  explicit AtomicBitmap(uint64_t bits) { resize(bits); }

  void resize(uint64_t bits) {
    bits_ = bits;
    nwords_ = (bits + 63) / 64;
    words_ = std::make_unique<std::atomic<uint64_t>[]>(nwords_);
    for (size_t i = 0; i < nwords_; ++i) words_[i].store(0, std::memory_order_relaxed);
  }
  [[nodiscard]] uint64_t size() const noexcept { return bits_; }
  [[nodiscard]] size_t word_count() const noexcept { return nwords_; }

  [[nodiscard]] bool test(uint64_t i) const noexcept {
    return (words_[i / 64].load(std::memory_order_acquire) >> (i % 64)) & 1u;
  }
  // Returns the previous value.
  bool set(uint64_t i) noexcept {
    const uint64_t mask = uint64_t{1} << (i % 64);
    return words_[i / 64].fetch_or(mask, std::memory_order_acq_rel) & mask;
  }
  bool clear(uint64_t i) noexcept {
    const uint64_t mask = uint64_t{1} << (i % 64);
    return words_[i / 64].fetch_and(~mask, std::memory_order_acq_rel) & mask;
  }
  // True if bits [first, last] are all set.
  [[nodiscard]] bool all_set(uint64_t first, uint64_t last) const noexcept {
    for (uint64_t i = first; i <= last;) {
      const uint64_t w = words_[i / 64].load(std::memory_order_acquire);
      const unsigned lo = i % 64;
      const unsigned hi = (last / 64 == i / 64) ? last % 64 : 63;
      const uint64_t mask = (hi == 63 ? ~uint64_t{0} : ((uint64_t{1} << (hi + 1)) - 1)) & (~uint64_t{0} << lo);
      if ((w & mask) != mask) return false;
      i = (i / 64 + 1) * 64;
    }
    return true;
  }
  // True if any bit in [first, last] is set.
  [[nodiscard]] bool any_set(uint64_t first, uint64_t last) const noexcept {
    for (uint64_t i = first; i <= last; ++i) {
      if (i % 64 == 0 && i + 63 <= last) {
        if (words_[i / 64].load(std::memory_order_acquire)) return true;
        i += 63;
        continue;
      }
      if (test(i)) return true;
    }
    return false;
  }
  // The first set bit at or after `from`, or size() if none.
  [[nodiscard]] uint64_t find_set(uint64_t from) const noexcept {
    for (uint64_t i = from; i < bits_;) {
      uint64_t w = words_[i / 64].load(std::memory_order_acquire) >> (i % 64);
      if (w) {
        const uint64_t r = i + static_cast<uint64_t>(std::countr_zero(w));
        return r < bits_ ? r : bits_;
      }
      i = (i / 64 + 1) * 64;
    }
    return bits_;
  }
  // The first clear bit at or after `from`, or size() if none.
  [[nodiscard]] uint64_t find_clear(uint64_t from) const noexcept {
    for (uint64_t i = from; i < bits_;) {
      uint64_t w = ~words_[i / 64].load(std::memory_order_acquire) >> (i % 64);
      if (w) {
        const uint64_t r = i + static_cast<uint64_t>(std::countr_zero(w));
        return r < bits_ ? r : bits_;
      }
      i = (i / 64 + 1) * 64;
    }
    return bits_;
  }
  [[nodiscard]] uint64_t count() const noexcept {
    uint64_t n = 0;
    for (size_t i = 0; i < nwords_; ++i) n += std::popcount(words_[i].load(std::memory_order_relaxed));
    return n;
  }
  [[nodiscard]] uint64_t word(size_t i) const noexcept { return words_[i].load(std::memory_order_acquire); }
  void store_word(size_t i, uint64_t v) noexcept { words_[i].store(v, std::memory_order_release); }
  // Atomically takes a word's bits and leaves it zero.
  uint64_t exchange_word(size_t i, uint64_t v) noexcept { return words_[i].exchange(v, std::memory_order_acq_rel); }

 private:
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
  size_t nwords_ = 0;
  uint64_t bits_ = 0;
};

}  // namespace blockway::cache
