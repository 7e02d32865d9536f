// RemoteBandwidth: the daemon-wide cap on bytes moved to and from remotes
// (`--remote-bandwidth`), shared by every export, and RemoteBandwidthLayer,
// which charges each remote read and write to it.
//
// One token bucket (TokenBucket) refilled at the cap, holding a tenth of a
// second of it. Two classes share it: background work (the prefetch, whose
// reads carry kBackground) and everything else (client misses, readahead,
// writethrough writes, write-back). While both wait, they are served in
// weighted fair shares, 3 to 1 in favour of client work (start-time fair
// queueing over bytes: the class with the smaller served-bytes / weight goes
// next), so prefetch cannot starve client misses nor be starved by them;
// either class alone gets the whole cap. Background work beyond its share
// takes only spare tokens (it waits for a full bucket), so client requests
// that arrive one after another are not delayed behind it; a class that was
// idle keeps at most one bucket of credit. Within a class requests go in
// arrival order. A request is charged in 64 KiB slices, each a turn of its
// class, so a large prefetch run cannot hold the link for long; a slice
// larger than the bucket (a tiny cap) borrows, as in QosLayer.
//
// set_rate() changes the cap at run time (`blockway remote-bandwidth`): the
// bucket keeps its level (clamped to the new capacity) and the pump grants
// again under the new rate.
//
// The per-export `prefetch-rate` stays a limit of one export's prefetch
// (the Prefetcher's own TokenBucket); this cap is the link's budget above it.
//
// Thread model: acquire() may be called from any event-loop thread. One
// mutex guards the bucket and queues (never held across a co_await). A
// waiting request sleeps on a timer on its own executor; the grants are
// made by pump(), which runs on `pump_executor` (its timer is only touched
// there) and wakes a granted request by posting a cancel() to that
// request's executor. Executors must be single-threaded (io_contexts).
#pragma once

#include "core/block_device.hpp"
#include "core/token_bucket.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <array>
#include <atomic>
#include <deque>
#include <memory>
#include <mutex>

namespace blockway::core {

struct RemoteBandwidthStats {
  uint64_t rate = 0;                            // bytes per second; 0 = no cap
  std::array<uint64_t, 2> bytes{};              // charged: [client, background]
  std::array<uint64_t, 2> delayed{};            // requests that waited
  std::array<double, 2> delay_seconds{};        // their waits, summed
  std::array<uint64_t, 2> queued{};             // waiting now
};

class RemoteBandwidth : public std::enable_shared_from_this<RemoteBandwidth> {
 public:
  enum Class : size_t { client = 0, background = 1 };
  static constexpr std::array<double, 2> kWeights = {3.0, 1.0};

  RemoteBandwidth(uint64_t bytes_per_second, boost::asio::any_io_executor pump_executor);

  // Waits until `bytes` may go to or come from a remote.
  Task<void> acquire(uint64_t bytes, Class c);
  [[nodiscard]] RemoteBandwidthStats stats() const;
  [[nodiscard]] uint64_t rate() const noexcept { return rate_.load(std::memory_order_relaxed); }
  // A new cap, at once: waiting requests are granted under it (0 lifts the
  // cap; the layers stay in the stacks and let everything through).
  void set_rate(uint64_t bytes_per_second);

 private:
  using Clock = TokenBucket::Clock;
  struct Waiter {
    explicit Waiter(const boost::asio::any_io_executor& ex) : timer(ex) {}
    uint64_t bytes = 0;
    Clock::time_point arrived;
    std::atomic<bool> granted{false};
    boost::asio::steady_timer timer;
  };

  static constexpr uint64_t kSlice = 64 << 10;  // the unit of the fair shares

  Task<void> acquire_slice(uint64_t bytes, Class c);
  // Grants what the bucket allows, fairly; arms the pump timer for the rest.
  // Runs on the pump executor.
  void pump();
  // Under mutex_: grants waiters while tokens last; returns when the next
  // one may go (or time_point::max() when none waits).
  Clock::time_point grant(Clock::time_point now);

  std::atomic<uint64_t> rate_;
  boost::asio::any_io_executor pump_executor_;
  boost::asio::steady_timer pump_timer_;  // on pump_executor_ only

  mutable std::mutex mutex_;
  TokenBucket bucket_;
  std::array<std::deque<std::shared_ptr<Waiter>>, 2> queues_;
  std::array<double, 2> virtual_time_{};  // bytes served / weight, per class
  RemoteBandwidthStats stats_;
};

// Charges every read and write of the device below (a remote) to the cap as
// client work. Reads with kBackground are the prefetch's, which took its
// budget (as background work) before it claimed the chunks: not charged
// again, and the flag is not passed on.
class RemoteBandwidthLayer final : public Layer {
 public:
  RemoteBandwidthLayer(std::unique_ptr<BlockDevice> next, std::shared_ptr<RemoteBandwidth> cap)
      : Layer(std::move(next)), cap_(std::move(cap)) {}

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) override;

 private:
  std::shared_ptr<RemoteBandwidth> cap_;
};

}  // namespace blockway::core
