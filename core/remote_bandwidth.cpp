#include "core/remote_bandwidth.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>

namespace blockway::core {

RemoteBandwidth::RemoteBandwidth(uint64_t bytes_per_second, boost::asio::any_io_executor pump_executor)
    : rate_(bytes_per_second), pump_executor_(std::move(pump_executor)), pump_timer_(pump_executor_) {
  // A tenth of a second of the cap: enough to keep a link busy, small enough
  // that the fair shares show within a second.
  bucket_.configure(static_cast<double>(bytes_per_second), std::max(1.0, static_cast<double>(bytes_per_second) / 10),
                    Clock::now());
  stats_.rate = bytes_per_second;
}

void RemoteBandwidth::set_rate(uint64_t bytes_per_second) {
  {
    std::lock_guard lock(mutex_);
    rate_.store(bytes_per_second, std::memory_order_relaxed);
    bucket_.reconfigure(static_cast<double>(bytes_per_second),
                        std::max(1.0, static_cast<double>(bytes_per_second) / 10), Clock::now());
    stats_.rate = bytes_per_second;
  }
  // The waiting requests: granted now, or at times computed from the new rate.
  boost::asio::post(pump_executor_, [self = shared_from_this()] { self->pump(); });
}

RemoteBandwidthStats RemoteBandwidth::stats() const {
  std::lock_guard lock(mutex_);
  RemoteBandwidthStats s = stats_;
  for (size_t c = 0; c < 2; ++c) s.queued[c] = queues_[c].size();
  return s;
}

Task<void> RemoteBandwidth::acquire(uint64_t bytes, Class c) {
  if (rate_.load(std::memory_order_relaxed) == 0) co_return;
  // In slices: a 1 MiB prefetch run is sixteen turns, not one that puts the
  // bucket a quarter second in debt in front of every client request.
  for (uint64_t left = bytes; left > 0;) {
    const uint64_t n = std::min(left, kSlice);
    co_await acquire_slice(n, c);
    left -= n;
  }
}

Task<void> RemoteBandwidth::acquire_slice(uint64_t bytes, Class c) {
  const auto ex = co_await boost::asio::this_coro::executor;
  std::shared_ptr<Waiter> w;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    stats_.bytes[c] += bytes;
    const double cost = static_cast<double>(bytes);
    // Nobody waits and the bucket has enough: go now.
    if (queues_[0].empty() && queues_[1].empty() && bucket_.ready_at(cost, now) <= now) {
      bucket_.take(cost, now);
      virtual_time_[c] += cost / kWeights[c];
      co_return;
    }
    // A class that was idle keeps at most one bucket of credit: it cannot
    // save up a share while it has nothing to do.
    if (queues_[c].empty())
      virtual_time_[c] = std::max(virtual_time_[c], virtual_time_[1 - c] - bucket_.capacity() / kWeights[c]);
    w = std::make_shared<Waiter>(ex);
    w->bytes = bytes;
    w->arrived = now;
    w->timer.expires_at(Clock::time_point::max());
    queues_[c].push_back(w);
    ++stats_.delayed[c];
  }
  boost::asio::post(pump_executor_, [self = shared_from_this()] { self->pump(); });
  while (!w->granted.load(std::memory_order_acquire))
    co_await w->timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

RemoteBandwidth::Clock::time_point RemoteBandwidth::grant(Clock::time_point now) {
  for (;;) {
    const bool has0 = !queues_[0].empty(), has1 = !queues_[1].empty();
    if (!has0 && !has1) return Clock::time_point::max();
    const size_t c = !has1 ? 0 : !has0 ? 1 : (virtual_time_[0] <= virtual_time_[1] ? 0 : 1);
    auto& w = queues_[c].front();
    const double cost = static_cast<double>(w->bytes);
    // Background work not owed a share takes spare tokens only (a full
    // bucket), so that a client request arriving next still finds some.
    const bool spare_only = c == background && virtual_time_[background] > virtual_time_[client];
    const auto at = bucket_.ready_at(spare_only ? std::max(cost, bucket_.capacity()) : cost, now);
    if (at > now) return at;
    bucket_.take(cost, now);
    virtual_time_[c] += cost / kWeights[c];
    stats_.delay_seconds[c] += std::chrono::duration<double>(now - w->arrived).count();
    w->granted.store(true, std::memory_order_release);
    boost::asio::post(w->timer.get_executor(), [w] { w->timer.cancel(); });
    queues_[c].pop_front();
  }
}

void RemoteBandwidth::pump() {
  Clock::time_point next;
  {
    std::lock_guard lock(mutex_);
    next = grant(Clock::now());
  }
  if (next == Clock::time_point::max()) return;
  // Re-arming cancels an earlier wait (its handler sees operation_aborted).
  pump_timer_.expires_at(next);
  pump_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->pump();
  });
}

Task<std::error_code> RemoteBandwidthLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  // kBackground: the prefetch took its budget before it claimed the chunks.
  if (!(flags & kBackground)) co_await cap_->acquire(buf.size(), RemoteBandwidth::client);
  co_return co_await next().read(buf, offset, flags & ~kBackground);
}

Task<std::error_code> RemoteBandwidthLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  co_await cap_->acquire(buf.size(), RemoteBandwidth::client);
  co_return co_await next().write(buf, offset, flags);
}

}  // namespace blockway::core
