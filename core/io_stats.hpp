// Per-export request counters, updated by CheckedDevice on every request.
//
// Thread model: lock-free; every field is a relaxed atomic, so counters from
// different threads may be momentarily out of step with each other.
#pragma once

#include <atomic>
#include <cstdint>

namespace blockway::core {

struct IoStatsSnapshot {
  uint64_t reads = 0, writes = 0, flushes = 0, trims = 0, zeroes = 0, block_status = 0,
           prefetches = 0, errors = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
};

class IoStats {
 public:
  void count_read(uint64_t bytes) noexcept { add(reads_, 1), add(bytes_read_, bytes); }
  void count_write(uint64_t bytes) noexcept { add(writes_, 1), add(bytes_written_, bytes); }
  void count_flush() noexcept { add(flushes_, 1); }
  void count_trim() noexcept { add(trims_, 1); }
  void count_zero() noexcept { add(zeroes_, 1); }
  void count_block_status() noexcept { add(block_status_, 1); }
  void count_prefetch() noexcept { add(prefetches_, 1); }
  void count_error() noexcept { add(errors_, 1); }

  [[nodiscard]] IoStatsSnapshot snapshot() const noexcept {
    IoStatsSnapshot s;
    s.reads = get(reads_);
    s.writes = get(writes_);
    s.flushes = get(flushes_);
    s.trims = get(trims_);
    s.zeroes = get(zeroes_);
    s.block_status = get(block_status_);
    s.prefetches = get(prefetches_);
    s.errors = get(errors_);
    s.bytes_read = get(bytes_read_);
    s.bytes_written = get(bytes_written_);
    return s;
  }

 private:
  using Counter = std::atomic<uint64_t>;
  static void add(Counter& c, uint64_t n) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
  static uint64_t get(const Counter& c) noexcept { return c.load(std::memory_order_relaxed); }

  Counter reads_{0}, writes_{0}, flushes_{0}, trims_{0}, zeroes_{0}, block_status_{0},
      prefetches_{0}, errors_{0}, bytes_read_{0}, bytes_written_{0};
};

}  // namespace blockway::core
