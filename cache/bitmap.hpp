// AtomicBitmap: one bit per chunk (or region), readable and writable from
// any thread without locks; StableArray: the storage under it, which never
// moves, so a bitmap (or a counter array) can grow while it is read.
//
// Why: a cache export grows while served (the remote image was resized).
// Requests, stats, the background loop and the prefetcher read the bitmaps
// without locks; if growing reallocated the words, any of them could read
// freed memory. Instead the storage reserves address space up front
// (PROT_NONE: no memory is charged for it) and grow() makes more of it
// usable in place, then publishes the new size (release). A reader that
// saw the old size keeps working on the old range; one that saw the new
// size finds its words committed and zero. The data path pays nothing: a
// bit test is the same pointer + index as before.
//
// Thread model: every bit operation is a single atomic RMW on its 64-bit
// word (relaxed for tests on the hot path, acq_rel for changes), so
// concurrent set/clear of different bits never lose each other. Scans see a
// consistent word at a time, not a consistent whole. resize() must not run
// concurrently with anything; grow() may run concurrently with every reader
// and writer, but not with another grow() or resize() of the same object.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace blockway::cache {

// Elements that never move: address space for up to capacity() of them is
// reserved at reset(), size() of them are usable (value-initialised), and
// grow() makes more usable in place.
template <class T>
class StableArray {
  static_assert(std::is_trivially_destructible_v<T>);

 public:
  StableArray() = default;
  ~StableArray() { release(); }
  StableArray(const StableArray&) = delete;
  StableArray& operator=(const StableArray&) = delete;

  // n usable elements, room for `reserve` (at least n). If the address space
  // for `reserve` cannot be had (RLIMIT_AS), only n: grow() then fails.
  void reset(size_t n, size_t reserve = 0) {
    release();
    reserve = std::max<size_t>({reserve, n, 1});
    void* p = map(reserve);
    if (!p && reserve > std::max<size_t>(n, 1)) p = map(reserve = std::max<size_t>(n, 1));
    if (!p) throw std::bad_alloc();
    data_ = static_cast<T*>(p);
    capacity_ = reserve;
    if (!grow(n)) throw std::bad_alloc();
  }
  // Makes the first n elements usable (new ones value-initialised); false if
  // n is beyond capacity() or the memory cannot be had. Never shrinks.
  bool grow(size_t n) {
    const size_t have = size_.load(std::memory_order_relaxed);
    if (n <= have) return true;
    if (n > capacity_) return false;
    const size_t bytes = round_up(n * sizeof(T));
    if (bytes > committed_bytes_) {
      if (::mprotect(reinterpret_cast<char*>(data_) + committed_bytes_, bytes - committed_bytes_,
                     PROT_READ | PROT_WRITE) != 0)
        return false;
      committed_bytes_ = bytes;
    }
    for (size_t i = have; i < n; ++i) new (data_ + i) T();
    size_.store(n, std::memory_order_release);
    return true;
  }
  [[nodiscard]] T& operator[](size_t i) const noexcept { return data_[i]; }
  [[nodiscard]] size_t size() const noexcept { return size_.load(std::memory_order_acquire); }
  [[nodiscard]] size_t capacity() const noexcept { return capacity_; }

 private:
  static size_t page() noexcept {
    static const size_t p = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return p;
  }
  static size_t round_up(size_t bytes) noexcept { return (bytes + page() - 1) / page() * page(); }
  void* map(size_t n) {
    reserved_bytes_ = round_up(n * sizeof(T));
    void* p = ::mmap(nullptr, reserved_bytes_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  void release() noexcept {
    if (data_) ::munmap(data_, reserved_bytes_);
    data_ = nullptr;
    capacity_ = committed_bytes_ = reserved_bytes_ = 0;
    size_.store(0, std::memory_order_relaxed);
  }

  T* data_ = nullptr;
  size_t capacity_ = 0, committed_bytes_ = 0, reserved_bytes_ = 0;
  std::atomic<size_t> size_{0};
};

class AtomicBitmap {
 public:
  AtomicBitmap() = default;
  explicit AtomicBitmap(uint64_t bits) { resize(bits); }

  // `bits` clear bits, with room to grow() to `reserve_bits` in place.
  void resize(uint64_t bits, uint64_t reserve_bits = 0) {
    words_.reset((bits + 63) / 64, (std::max(bits, reserve_bits) + 63) / 64);
    bits_.store(bits, std::memory_order_release);
  }
  // Makes the words of up to `bits` usable (clear) without showing them yet:
  // false if beyond the reservation or out of memory. Growing several
  // bitmaps that are read together (a word of one with the same word of
  // another) makes room in all of them first, then grows each.
  bool make_room(uint64_t bits) { return words_.grow((bits + 63) / 64); }
  // Up to `bits` (new bits clear), in place; the words are usable before the
  // new size is published. False if there is no room (make_room).
  bool grow(uint64_t bits) {
    if (bits <= size()) return true;
    if (!make_room(bits)) return false;
    bits_.store(bits, std::memory_order_release);
    return true;
  }
  // The most bits grow() can reach.
  [[nodiscard]] uint64_t capacity() const noexcept { return uint64_t{words_.capacity()} * 64; }
  [[nodiscard]] uint64_t size() const noexcept { return bits_.load(std::memory_order_acquire); }
  [[nodiscard]] size_t word_count() const noexcept { return static_cast<size_t>((size() + 63) / 64); }

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
    const uint64_t bits = size();
    for (uint64_t i = from; i < bits;) {
      uint64_t w = words_[i / 64].load(std::memory_order_acquire) >> (i % 64);
      if (w) {
        const uint64_t r = i + static_cast<uint64_t>(std::countr_zero(w));
        return r < bits ? r : bits;
      }
      i = (i / 64 + 1) * 64;
    }
    return bits;
  }
  // The first clear bit at or after `from`, or size() if none.
  [[nodiscard]] uint64_t find_clear(uint64_t from) const noexcept {
    const uint64_t bits = size();
    for (uint64_t i = from; i < bits;) {
      uint64_t w = ~words_[i / 64].load(std::memory_order_acquire) >> (i % 64);
      if (w) {
        const uint64_t r = i + static_cast<uint64_t>(std::countr_zero(w));
        return r < bits ? r : bits;
      }
      i = (i / 64 + 1) * 64;
    }
    return bits;
  }
  [[nodiscard]] uint64_t count() const noexcept {
    uint64_t n = 0;
    const size_t words = word_count();
    for (size_t i = 0; i < words; ++i) n += std::popcount(words_[i].load(std::memory_order_relaxed));
    return n;
  }
  [[nodiscard]] uint64_t word(size_t i) const noexcept { return words_[i].load(std::memory_order_acquire); }
  void store_word(size_t i, uint64_t v) noexcept { words_[i].store(v, std::memory_order_release); }
  // Atomically takes a word's bits and leaves it zero.
  uint64_t exchange_word(size_t i, uint64_t v) noexcept { return words_[i].exchange(v, std::memory_order_acq_rel); }

 private:
  StableArray<std::atomic<uint64_t>> words_;
  std::atomic<uint64_t> bits_{0};
};

}  // namespace blockway::cache
