#include "core/retry_layer.hpp"

#include "core/logging.hpp"
#include "core/options.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>

#include <algorithm>

namespace blockway::core {
namespace {

using Clock = std::chrono::steady_clock;

Task<void> sleep_until(Clock::time_point t) {
  const auto ex = co_await boost::asio::this_coro::executor;
  boost::asio::steady_timer timer(ex, t);
  co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

class WritesLostCategory final : public std::error_category {
 public:
  [[nodiscard]] const char* name() const noexcept override { return "blockway.writes-lost"; }
  [[nodiscard]] std::string message(int) const override {
    return "Input/output error (writes acknowledged on a lost remote session were never flushed there)";
  }
  [[nodiscard]] std::error_condition default_error_condition(int ev) const noexcept override {
    return std::generic_category().default_error_condition(ev);
  }
};

}  // namespace

const std::error_category& writes_lost_category() noexcept {
  static const WritesLostCategory category;
  return category;
}

const OptionSpec RetryOptions::kTimeoutOption{
    .name = "retry-timeout",
    .kind = OptionKind::seconds,
    .help = "how long a request waits for a lost session to come back before it fails with EIO (default 30)",
    .min = 0,
    .max = 86400};

RetryOptions RetryOptions::take_from(Options& options) {
  RetryOptions o;
  if (auto timeout = options.seconds(kTimeoutOption)) o.timeout = *timeout;
  return o;
}

RetryLayer::RetryLayer(std::unique_ptr<RemoteDevice> remote, RetryOptions options)
    : Layer(std::move(remote)),
      remote_(static_cast<RemoteDevice&>(next())),
      options_(options),
      backoff_(options.first_backoff) {}

RetryHealth RetryLayer::health() const {
  RetryHealth h;
  {
    std::lock_guard lock(mutex_);
    h = health_;
  }
  h.connected = remote_.connected();
  h.generation = remote_.generation();
  h.detail = remote_.health_detail();
  return h;
}

void RetryLayer::note_error(std::error_code ec) {
  std::lock_guard lock(mutex_);
  health_.last_error = ec;
}

void RetryLayer::note_write(uint64_t generation) {
  std::lock_guard lock(mutex_);
  const uint64_t seq = ++write_seq_;
  if (!unflushed_.empty() && unflushed_.back().generation == generation) {
    unflushed_.back().last_seq = seq;
  } else {
    unflushed_.push_back({generation, seq, seq});
  }
}

template <class Op>
Task<RetryLayer::Outcome> RetryLayer::with_retry(const char* what, Op op) {
  const auto deadline = Clock::now() + options_.timeout;
  bool warned = false;
  for (;;) {
    const uint64_t generation = remote_.generation();
    const std::error_code ec = co_await op();
    if (!ec || !is_connection_error(ec)) co_return Outcome{ec, generation};
    note_error(ec);
    if (!warned) {
      logger("retry")->warn("{}: {} failed: {}; reconnecting (for up to {} ms)", describe(), what,
                            ec.message(), options_.timeout.count());
      warned = true;
    }
    if (Clock::now() >= deadline || !co_await recover(generation, deadline)) {
      {
        std::lock_guard lock(mutex_);
        ++health_.failures;
      }
      logger("retry")->error("{}: {} failed with EIO: no working session within {} ms (last error: {})",
                             describe(), what, options_.timeout.count(), ec.message());
      co_return Outcome{errno_code(EIO), generation};
    }
    std::lock_guard lock(mutex_);
    ++health_.retries;
  }
}

Task<bool> RetryLayer::recover(uint64_t failed_generation, Clock::time_point deadline) {
  waiters_.fetch_add(1, std::memory_order_acq_rel);
  struct Leave {
    std::atomic<unsigned>& n;
    ~Leave() { n.fetch_sub(1, std::memory_order_acq_rel); }
  } leave{waiters_};
  for (;;) {
    if (remote_.generation() > failed_generation) co_return true;
    if (Clock::now() >= deadline) co_return false;
    if (!reconnecting_.exchange(true, std::memory_order_acq_rel)) {
      // Detached: an attempt in progress is not abandoned when this request
      // gives up; the loop ends once nobody waits for it.
      boost::asio::any_io_executor ex = reconnect_executor_;
      if (!ex) ex = co_await boost::asio::this_coro::executor;
      boost::asio::co_spawn(ex, reconnect_loop(), boost::asio::detached);
    }
    co_await sleep_until(std::min(deadline, Clock::now() + options_.poll));
  }
}

Task<void> RetryLayer::reconnect_loop() {
  auto log = logger("retry");
  for (;;) {
    Clock::time_point not_before;
    {
      std::lock_guard lock(mutex_);
      not_before = next_attempt_;
    }
    // Back-off holds across loops: a new loop does not restart the clock.
    if (Clock::now() < not_before) co_await sleep_until(not_before);
    if (waiters_.load(std::memory_order_acquire) == 0) break;
    const std::error_code ec = co_await remote_.reconnect();
    std::lock_guard lock(mutex_);
    if (!ec) {
      ++health_.reconnects;
      backoff_ = options_.first_backoff;
      next_attempt_ = Clock::now();
      log->info("{}: reconnected after {} attempt(s)", describe(), attempts_ + 1);
      attempts_ = 0;
      break;
    }
    health_.last_error = ec;
    ++attempts_;
    next_attempt_ = Clock::now() + backoff_;
    log->debug("{}: reconnect failed: {}; next attempt in {} ms", describe(), ec.message(), backoff_.count());
    backoff_ = std::min(backoff_ * 2, options_.max_backoff);
  }
  reconnecting_.store(false, std::memory_order_release);
}

Task<std::error_code> RetryLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  auto out = co_await with_retry("read", [&] { return next().read(buf, offset, flags); });
  co_return out.ec;
}

Task<std::error_code> RetryLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  auto out = co_await with_retry("write", [&] { return next().write(buf, offset, flags); });
  if (!out.ec && !(flags & kFua)) note_write(out.generation);
  co_return out.ec;
}

Task<std::error_code> RetryLayer::zero(ByteRange range, IoFlags flags) {
  auto out = co_await with_retry("write-zeroes", [&] { return next().zero(range, flags); });
  if (!out.ec && !(flags & kFua)) note_write(out.generation);
  co_return out.ec;
}

Task<std::error_code> RetryLayer::trim(ByteRange range, IoFlags flags) {
  // A lost trim leaves old data where the client allowed anything: advisory.
  auto out = co_await with_retry("trim", [&] { return next().trim(range, flags); });
  co_return out.ec;
}

Task<std::error_code> RetryLayer::flush() {
  uint64_t covered_seq = 0;
  {
    std::lock_guard lock(mutex_);
    covered_seq = write_seq_;  // writes acknowledged before this flush began
  }
  auto out = co_await with_retry("flush", [&] { return next().flush(); });
  if (out.ec) co_return out.ec;
  bool lost = false;
  {
    std::lock_guard lock(mutex_);
    while (!unflushed_.empty() && unflushed_.front().first_seq <= covered_seq) {
      Run& run = unflushed_.front();
      if (run.generation < out.generation) lost = true;
      if (run.last_seq <= covered_seq) {
        unflushed_.pop_front();
      } else {
        run.first_seq = covered_seq + 1;
        break;
      }
    }
    if (lost) ++health_.failures;
  }
  if (lost) {
    logger("retry")->error("{}: flush fails with EIO: writes acknowledged before a reconnect were never "
                           "flushed on their session and may be lost on the remote (a cache above writes "
                           "again what it still holds)",
                           describe());
    co_return writes_lost_error();
  }
  co_return std::error_code{};
}

Task<std::error_code> RetryLayer::block_status(ByteRange range, ExtentList& out) {
  const size_t keep = out.size();
  auto res = co_await with_retry("block-status", [&] {
    out.resize(keep);  // drop what a failed attempt may have appended
    return next().block_status(range, out);
  });
  co_return res.ec;
}

Task<std::error_code> RetryLayer::prefetch(ByteRange range) {
  auto out = co_await with_retry("prefetch", [&] { return next().prefetch(range); });
  co_return out.ec;
}

}  // namespace blockway::core
