// Pieces the CacheLayer's source files share: the RAII guards a request
// holds (InFlight, RegionWrites, EpochGuard), the fill a claim waits on,
// catalogue_call(), all_zero() and kMaxRun. Private to cache/: include it
// only from the cache_*.cpp files of CacheLayer.
//
// Thread model: as CacheLayer's (cache_layer.hpp): guards live on whichever
// loop runs the request that holds them; their counters are atomics.
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/catalogue_call.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"
#include "core/shared_event.hpp"
#include "core/task.hpp"

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <cstring>
#include <exception>
#include <mutex>
#include <utility>
#include <vector>

namespace blockway::cache {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;

// Largest single remote request of a fill or a write-back.
inline constexpr uint64_t kMaxRun = 1u << 20;

inline bool all_zero(const std::byte* p, size_t n) {
  if (n == 0) return true;
  const size_t head = std::min<size_t>(n, 16);
  for (size_t i = 0; i < head; ++i)
    if (p[i] != std::byte{0}) return false;
  return n <= 16 || std::memcmp(p, p + 16, n - 16) == 0;
}

// n bytes for people: "768.0 KiB".
inline std::string human_bytes(uint64_t n) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  else
    std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

struct CacheLayer::Fill {
  // A deferred fill's state (cache_deferred_fill.cpp), under `mutex`.
  struct Deferred {
    std::mutex mutex;
    std::vector<std::pair<uint32_t, uint32_t>> written;  // [lo, hi) in the chunk, sorted, disjoint
    int writers = 0;      // joined writes whose bytes may not be in the cache file yet
    uint64_t joins = 0;   // writes that joined, ever (the grace watches it grow)
    bool urgent = false;  // a read or FLUSH waits for it: fetch now, grace over
    boost::asio::steady_timer* grace_timer = nullptr;  // the runner's, while it waits out the grace
    bool closed = false;  // the fetch ended: no more joins; the last writer out completes
    bool fetched = false;  // `data` holds the remote's chunk
    std::error_code fetch_ec;  // the last fetch's error, when not fetched
    core::IoBuffer data;
    std::shared_ptr<core::SharedEvent> attempt;  // the current fetch: set with its error, or at the end
    [[nodiscard]] bool covers(uint64_t len) const noexcept {
      return written.size() == 1 && written[0].first == 0 && written[0].second >= len;
    }
  };
  core::SharedEvent done;
  std::unique_ptr<Deferred> deferred;  // set for a deferred fill
};

// Counts writes in progress per region while it lives, and marks the regions
// touched when it ends, so a checkpoint keeps their write-intent.
class CacheLayer::RegionWrites {
 public:
  RegionWrites(CacheLayer& c, uint64_t first_chunk, uint64_t last_chunk)
      : c_(c), r0_(first_chunk / kChunksPerRegion), r1_(last_chunk / kChunksPerRegion) {
    for (uint64_t r = r0_; r <= r1_; ++r) c_.region_writes_[r].fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  ~RegionWrites() {
    for (uint64_t r = r0_; r <= r1_; ++r) {
      c_.touched_.set(r);
      c_.region_writes_[r].fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  RegionWrites(const RegionWrites&) = delete;
  RegionWrites& operator=(const RegionWrites&) = delete;

 private:
  CacheLayer& c_;
  uint64_t r0_, r1_;
};

class CacheLayer::EpochGuard {
 public:
  explicit EpochGuard(CacheLayer& c) : c_(c.capacity_chunks_ ? &c : nullptr) {
    if (!c_) return;
    // Register in the epoch that is current *after* the count went up: a
    // count added to an epoch that eviction already left (a stale load) is
    // waited for by nobody, and the reader could then read a chunk while it
    // is punched out of the cache file.
    for (;;) {
      e_ = c_->epoch_.load(std::memory_order_seq_cst);
      c_->epoch_active_[e_].fetch_add(1, std::memory_order_seq_cst);
      if (c_->epoch_.load(std::memory_order_seq_cst) == e_) break;
      c_->epoch_active_[e_].fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  ~EpochGuard() {
    if (c_) c_->epoch_active_[e_].fetch_sub(1, std::memory_order_seq_cst);
  }
  EpochGuard(const EpochGuard&) = delete;
  EpochGuard& operator=(const EpochGuard&) = delete;

 private:
  CacheLayer* c_;
  uint32_t e_ = 0;
};

// Counts a client request in flight while it lives (detach and set_mode wait
// for none), and notes when the last one ended (the prefetcher's yield).
class CacheLayer::InFlight {
 public:
  explicit InFlight(CacheLayer& c) : c_(c) { c_.inflight_.fetch_add(1, std::memory_order_seq_cst); }
  ~InFlight() {
    c_.last_request_end_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                               std::memory_order_relaxed);
    c_.inflight_.fetch_sub(1, std::memory_order_seq_cst);
  }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  CacheLayer& c_;
};

}  // namespace blockway::cache
