#include "core/io_trace.hpp"

#include <algorithm>

namespace blockway::core {

IoTrace::IoTrace(size_t capacity) : ring_(std::max<size_t>(capacity, 1)) {}

void IoTrace::record(Clock::time_point start, Clock::time_point end, IoOp op, uint64_t offset, uint64_t length,
                     CacheOutcome cache, int error) {
  TraceRecord r;
  // A request that began just before the trace did is stamped 0.
  const auto ns = [](Clock::duration d) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
  };
  r.start_ns = start > began_ ? ns(start - began_) : 0;
  r.latency_ns = end > start ? ns(end - start) : 0;
  r.op = op;
  r.offset = offset;
  r.length = length;
  r.cache = cache;
  r.error = error;
  std::lock_guard lock(mutex_);
  if (size_ == ring_.size()) {
    ++dropped_;  // the reader fell behind: the newest record is the one lost
    return;
  }
  ring_[(head_ + size_) % ring_.size()] = r;
  ++size_;
  ++recorded_;
}

std::vector<TraceRecord> IoTrace::drain(size_t max) {
  std::lock_guard lock(mutex_);
  const size_t n = std::min(max, size_);
  std::vector<TraceRecord> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(ring_[(head_ + i) % ring_.size()]);
  head_ = (head_ + n) % ring_.size();
  size_ -= n;
  return out;
}

uint64_t IoTrace::dropped() const {
  std::lock_guard lock(mutex_);
  return dropped_;
}

uint64_t IoTrace::recorded() const {
  std::lock_guard lock(mutex_);
  return recorded_;
}

}  // namespace blockway::core
