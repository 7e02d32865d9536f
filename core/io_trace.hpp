// I/O traces: a bounded buffer of per-request records that CheckedDevice
// fills while `blockway trace` runs, and the note through which the cache
// layer tells the request it serves whether it hit.
//
// Thread model: IoTrace::record() is called from every event loop at once
// and drain() from the control plane; one mutex guards the ring (held for a
// copy of one record: tracing is a diagnostic mode, the untraced data path
// never touches it). The RequestNote pointer is thread-local: set by
// CheckedDevice just before it calls the layer below, taken by the cache
// layer in the synchronous start of its read, and cleared by CheckedDevice
// when the request ends, so it never outlives the request it points into.
#pragma once

#include "core/io_stats.hpp"

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

namespace blockway::core {

enum class CacheOutcome : uint8_t { none, hit, miss };

struct RequestNote {
  CacheOutcome cache = CacheOutcome::none;
};

// The note of the request now entering the layers below on this thread.
// Null unless that request is traced.
inline thread_local RequestNote* current_request_note = nullptr;

// Takes the current note (the caller serves that request).
[[nodiscard]] inline RequestNote* take_request_note() noexcept {
  RequestNote* n = current_request_note;
  current_request_note = nullptr;
  return n;
}

struct TraceRecord {
  uint64_t start_ns = 0;  // since the trace began
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t latency_ns = 0;
  IoOp op = IoOp::read;
  CacheOutcome cache = CacheOutcome::none;
  int error = 0;  // errno; 0 = success
};

class IoTrace {
 public:
  using Clock = std::chrono::steady_clock;
  // Keeps at most `capacity` undrained records; more are counted as dropped.
  explicit IoTrace(size_t capacity);

  void record(Clock::time_point start, Clock::time_point end, IoOp op, uint64_t offset, uint64_t length,
              CacheOutcome cache, int error);
  // Moves up to `max` records, oldest first, out of the buffer.
  [[nodiscard]] std::vector<TraceRecord> drain(size_t max);
  [[nodiscard]] uint64_t dropped() const;
  [[nodiscard]] uint64_t recorded() const;
  [[nodiscard]] Clock::time_point began() const noexcept { return began_; }

 private:
  const Clock::time_point began_ = Clock::now();
  mutable std::mutex mutex_;
  std::vector<TraceRecord> ring_;
  size_t head_ = 0;  // oldest record
  size_t size_ = 0;
  uint64_t dropped_ = 0;
  uint64_t recorded_ = 0;
};

}  // namespace blockway::core
