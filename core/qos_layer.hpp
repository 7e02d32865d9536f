// QosLayer: per-export limits on operations and bytes per second, for reads
// and writes separately, each with a burst.
//
// What counts: a read is one read operation and its length in read bytes; a
// write is one write operation and its length in write bytes; trim and
// write-zeroes are one write operation and no bytes (they carry no payload);
// NBD_CMD_CACHE (prefetch) is one read operation and no bytes. Flush and
// block-status pass unlimited: a flush covers only writes that completed
// before it, so it may overtake queued writes, and delaying it would only
// add latency.
//
// How: two token buckets per class (TokenBucket: operations and bytes),
// refilled continuously, holding `burst` seconds of each rate. A request
// reserves its tokens when it arrives, at the earliest time both buckets
// allow, after every earlier request of its class (FIFO: a large request is
// never overtaken, so it cannot starve); it then waits on an Asio timer on
// its own executor (no thread is parked, nothing polls). A request within the
// limits costs the lock, a clock read and the bucket arithmetic, in the
// caller's frame: no coroutine, timer or allocation of its own. A request larger
// than the burst borrows (the level goes negative) so it never waits
// forever. With no limit on a class the layer costs one atomic load.
//
// Run-time change (set_limits): the queued requests are scheduled again
// under the new limits, starting from an empty bucket at the time of the
// change (they were waiting, so the bucket was empty), and woken if they may
// now start earlier. Memory: one small record and timer per waiting request;
// the front end's in-flight caps bound how many wait.
//
// Thread model: any method may be called from any event-loop thread. One
// mutex guards the buckets, queues and counters and is never held across a
// co_await; a waiting request's timer is touched only on its own executor
// (a change posts the wake-up there). The executors must be single-threaded
// (the daemon's io_contexts are).
#pragma once

#include "core/block_device.hpp"
#include "core/options.hpp"
#include "core/token_bucket.hpp"

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>

namespace blockway::core {

struct QosLimits {
  uint64_t read_iops = 0, write_iops = 0;  // operations per second; 0 = unlimited
  uint64_t read_bps = 0, write_bps = 0;    // bytes per second; 0 = unlimited
  std::chrono::milliseconds burst{1000};   // each bucket holds this long of its rate

  [[nodiscard]] bool any() const noexcept { return read_iops || write_iops || read_bps || write_bps; }
  friend bool operator==(const QosLimits&, const QosLimits&) = default;

  // qos-read-iops, qos-write-iops, qos-read-bps, qos-write-bps, qos-burst.
  static std::span<const OptionSpec> options();
  // Takes those options from an export's options. Throws ConfigError naming the option.
  static QosLimits take_from(Options& options);
  // The limits as export options ("qos-read-iops=100,qos-write-bps=1048576,qos-burst=1"),
  // what is saved for a run-time change; parsed back by take_from.
  [[nodiscard]] std::string to_options() const;
  // Reads to_options()'s text back. Throws ConfigError prefixed with `where`.
  static QosLimits from_options(std::string_view text, const std::string& where);
};

struct QosClassStats {
  uint64_t delayed = 0;       // requests that waited
  double delay_seconds = 0;   // their waits, summed
  uint64_t queued = 0;        // waiting now
};

struct QosStats {
  QosLimits limits;
  QosClassStats read, write;
};

class QosLayer final : public Layer {
 public:
  QosLayer(std::unique_ptr<BlockDevice> next, QosLimits limits);

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override;
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override;
  Task<std::error_code> prefetch(ByteRange range) override;

  // Applies new limits at once, to waiting requests too.
  void set_limits(const QosLimits& limits);
  [[nodiscard]] QosLimits limits() const;
  [[nodiscard]] QosStats stats() const;

 private:
  using Clock = TokenBucket::Clock;
  struct Waiter;
  struct Class {
    std::atomic<bool> limited{false};
    TokenBucket ops, bytes;
    std::deque<std::shared_ptr<Waiter>> queue;
    QosClassStats stats;
  };

  // Reserves the start of a request of `bytes` bytes in `c`. Within the
  // limits it may start now: returns null, with no coroutine frame, timer or
  // allocation (the common case when limits are set but not reached).
  // Otherwise returns its queued record, for wait_turn().
  std::shared_ptr<Waiter> reserve_or_queue(Class& c, uint64_t bytes);
  // Waits until the queued request `w` may start.
  Task<void> wait_turn(Class& c, std::shared_ptr<Waiter> w);
  void configure(Class& c, uint64_t iops, uint64_t bps, Clock::time_point now, bool keep_level);
  // The start time of a request of `bytes` arriving at `now`, reserved.
  Clock::time_point reserve(Class& c, uint64_t bytes, Clock::time_point now);

  mutable std::mutex mutex_;
  QosLimits limits_;
  Class read_, write_;
};

}  // namespace blockway::core
