// RetryLayer: rides out a lost or hung remote session.
//
// An operation that fails with a connection error (is_connection_error()) is
// retried on a new session: the layer calls RemoteDevice::reconnect(), with
// exponential back-off between failed attempts (100 ms doubling to 5 s),
// until the operation's deadline (`retry-timeout`, default 30 s, counted from
// when the operation arrived). Past the deadline it fails with EIO. Other
// errors (EIO from the remote's disk, EINVAL, ...) pass through untouched.
//
// It never hangs forever: a request waits at most retry-timeout plus one
// backend io-timeout (the backend's own bound on a request that is already on
// the wire). It never acknowledges falsely: writes acknowledged on a session
// that later died, and not covered by a successful flush on that same
// session, may be lost on the remote; the next FLUSH that succeeds on a newer
// session reports EIO once for them (sticky until reported, like librbd's
// flush errors), after which they count as handled.
//
// One reconnect at a time: the first request that needs one starts a
// reconnect loop (detached, on the executor reconnect_on() named, else on the
// request's own) that tries until it succeeds
// or no request waits any more; every request that needs a session newer
// than the one it failed on waits for it, bounded by its own deadline. The
// back-off carries over from one loop to the next and resets on success. A request that failed on an old session retries at once if a
// newer one already exists.
//
// Thread model: any method may be called from any event-loop thread. The
// reconnect flag is an atomic; the unflushed-write runs and the health
// counters are under one mutex that is never held across a co_await. The
// reconnect loop keeps its io_context busy while it runs, so the layer must
// outlive the loops' run() (the daemon destroys exports after it returns).
#pragma once

#include "core/block_device.hpp"
#include "core/options.hpp"
#include "core/remote_device.hpp"

#include <boost/asio/any_io_executor.hpp>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <string>

namespace blockway::core {

struct RetryOptions {
  std::chrono::milliseconds timeout{30000};
  std::chrono::milliseconds first_backoff{100};
  std::chrono::milliseconds max_backoff{5000};
  // How often a request waiting for another request's reconnect looks again.
  std::chrono::milliseconds poll{10};

  // `retry-timeout`, taken by every export whose backend has a RetryLayer.
  static const OptionSpec kTimeoutOption;

  // Takes `retry-timeout` from an export's options. Throws ConfigError
  // naming the option.
  static RetryOptions take_from(Options& options);
};

struct RetryHealth {
  bool connected = false;
  std::error_code last_error;  // last connection error seen (or reconnect failure)
  uint64_t generation = 0;     // of the remote session
  uint64_t reconnects = 0;     // successful reconnects
  uint64_t retries = 0;        // operations re-issued after a connection error
  uint64_t failures = 0;       // operations failed with EIO by this layer
  std::string detail;          // the remote's own word on its health (RemoteDevice::health_detail)
};

class RetryLayer final : public Layer {
 public:
  RetryLayer(std::unique_ptr<RemoteDevice> remote, RetryOptions options);

  // Where the reconnect loop runs: an event loop that keeps running (the
  // export stack passes loop 0). Without it the loop runs on the executor of
  // the request that starts it, which must then keep running until the loop
  // ends: true of the daemon's loops, not of a caller that runs its own
  // io_context only until its request is done (the nbdkit plugin's worker
  // threads), where the loop would be stranded with reconnecting_ set and
  // every later request would wait for it in vain. Before any request.
  void reconnect_on(boost::asio::any_io_executor ex) { reconnect_executor_ = std::move(ex); }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> flush() override;
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override;
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override;
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override;
  Task<std::error_code> prefetch(ByteRange range) override;

  [[nodiscard]] RetryHealth health() const;

 private:
  struct Outcome {
    std::error_code ec;
    uint64_t generation = 0;  // session generation when the successful attempt started
  };
  // One run of acknowledged, not yet flushed writes on one session.
  struct Run {
    uint64_t generation = 0;
    uint64_t first_seq = 0;
    uint64_t last_seq = 0;
  };

  template <class Op>
  Task<Outcome> with_retry(const char* what, Op op);
  // Waits until a session newer than `failed_generation` exists (true), or
  // the deadline passes (false). Starts the reconnect loop if none runs.
  Task<bool> recover(uint64_t failed_generation, std::chrono::steady_clock::time_point deadline);
  // Attempts reconnect() with back-off until it succeeds or nobody waits.
  Task<void> reconnect_loop();
  void note_write(uint64_t generation);
  void note_error(std::error_code ec);

  RemoteDevice& remote_;
  RetryOptions options_;
  std::atomic<bool> reconnecting_{false};
  boost::asio::any_io_executor reconnect_executor_;  // empty: the starting request's
  std::atomic<unsigned> waiters_{0};  // requests inside recover()

  mutable std::mutex mutex_;
  std::deque<Run> unflushed_;
  uint64_t write_seq_ = 0;
  std::chrono::milliseconds backoff_;
  std::chrono::steady_clock::time_point next_attempt_{};
  uint64_t attempts_ = 0;  // failed attempts since the last success
  RetryHealth health_;
};

}  // namespace blockway::core
