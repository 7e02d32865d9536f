// Per-export request counters, updated by CheckedDevice on every request:
// per operation the requests, bytes, errors and a latency histogram.
//
// Thread model: lock-free; every field is a relaxed atomic (one add per
// counter per request, no lock), so counters from different threads may be
// momentarily out of step with each other.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace blockway::core {

enum class IoOp : uint8_t { read, write, flush, trim, zero, block_status, prefetch };
inline constexpr size_t kIoOps = 7;

[[nodiscard]] constexpr std::string_view to_string(IoOp op) noexcept {
  constexpr std::array<std::string_view, kIoOps> names{"read",  "write",        "flush",   "trim",
                                                       "zero",  "block_status", "prefetch"};
  return names[static_cast<size_t>(op)];
}

// Upper bounds (nanoseconds) of the latency histogram's buckets; a last,
// unbounded bucket follows. Spaced 1-2.5-5 from 10 us to 10 s: local cache
// hits land in the low buckets, remote misses and flushes in the high ones.
inline constexpr std::array<uint64_t, 19> kLatencyBucketsNs{
    10'000,      25'000,      50'000,      100'000,       250'000,       500'000,      1'000'000,
    2'500'000,   5'000'000,   10'000'000,  25'000'000,    50'000'000,    100'000'000,  250'000'000,
    500'000'000, 1'000'000'000, 2'500'000'000, 5'000'000'000, 10'000'000'000};
inline constexpr size_t kLatencyBuckets = kLatencyBucketsNs.size() + 1;

// Index of the bucket a latency falls in (the first bound >= it).
[[nodiscard]] constexpr size_t latency_bucket(uint64_t ns) noexcept {
  size_t i = 0;
  while (i < kLatencyBucketsNs.size() && ns > kLatencyBucketsNs[i]) ++i;
  return i;
}

struct OpStatsSnapshot {
  uint64_t requests = 0;    // accepted (valid) requests
  uint64_t bytes = 0;       // their lengths (0 for flush)
  uint64_t errors = 0;      // failed requests, rejected ones included
  uint64_t latency_ns = 0;  // sum of the completed requests' latencies
  std::array<uint64_t, kLatencyBuckets> buckets{};  // completed requests per bucket (not cumulative)
};

struct IoStatsSnapshot {
  uint64_t reads = 0, writes = 0, flushes = 0, trims = 0, zeroes = 0, block_status = 0,
           prefetches = 0, errors = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
  std::array<OpStatsSnapshot, kIoOps> ops{};
  [[nodiscard]] const OpStatsSnapshot& op(IoOp o) const noexcept { return ops[static_cast<size_t>(o)]; }
};

class IoStats {
 public:
  // A request accepted for `op`, of `bytes`.
  void count(IoOp op, uint64_t bytes) noexcept {
    auto& s = slot(op);
    add(s.requests, 1);
    if (bytes) add(s.bytes, bytes);
  }
  void count_error(IoOp op) noexcept { add(slot(op).errors, 1); }
  // An accepted request finished after `ns` nanoseconds.
  void observe(IoOp op, uint64_t ns) noexcept {
    auto& s = slot(op);
    add(s.latency_ns, ns);
    add(s.buckets[latency_bucket(ns)], 1);
  }

  [[nodiscard]] IoStatsSnapshot snapshot() const noexcept {
    IoStatsSnapshot s;
    for (size_t i = 0; i < kIoOps; ++i) {
      auto& o = s.ops[i];
      const auto& c = ops_[i];
      o.requests = get(c.requests);
      o.bytes = get(c.bytes);
      o.errors = get(c.errors);
      o.latency_ns = get(c.latency_ns);
      for (size_t b = 0; b < kLatencyBuckets; ++b) o.buckets[b] = get(c.buckets[b]);
      s.errors += o.errors;
    }
    s.reads = s.op(IoOp::read).requests;
    s.writes = s.op(IoOp::write).requests;
    s.flushes = s.op(IoOp::flush).requests;
    s.trims = s.op(IoOp::trim).requests;
    s.zeroes = s.op(IoOp::zero).requests;
    s.block_status = s.op(IoOp::block_status).requests;
    s.prefetches = s.op(IoOp::prefetch).requests;
    s.bytes_read = s.op(IoOp::read).bytes;
    s.bytes_written = s.op(IoOp::write).bytes;
    return s;
  }

 private:
  using Counter = std::atomic<uint64_t>;
  // One cache line per operation: reads and writes from different threads
  // do not bounce each other's lines.
  struct alignas(64) Op {
    Counter requests{0}, bytes{0}, errors{0}, latency_ns{0};
    std::array<Counter, kLatencyBuckets> buckets{};
  };
  Op& slot(IoOp op) noexcept { return ops_[static_cast<size_t>(op)]; }
  static void add(Counter& c, uint64_t n) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
  static uint64_t get(const Counter& c) noexcept { return c.load(std::memory_order_relaxed); }

  std::array<Op, kIoOps> ops_{};
};

}  // namespace blockway::core
