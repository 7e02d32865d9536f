#include "core/qos_layer.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>

namespace blockway::core {
namespace {

const OptionSpec kOptions[] = {
    {.name = "qos-read-iops",
     .kind = OptionKind::number,
     .help = "read operations per second this export serves (default 0: no limit)",
     .min = 0,
     .max = 4294967295},
    {.name = "qos-write-iops",
     .kind = OptionKind::number,
     .help = "write operations per second, trim and write-zeroes included (default 0: no limit)",
     .min = 0,
     .max = 4294967295},
    {.name = "qos-read-bps",
     .kind = OptionKind::size,
     .help = "bytes per second read from this export (default 0: no limit)"},
    {.name = "qos-write-bps",
     .kind = OptionKind::size,
     .help = "bytes per second written to this export (default 0: no limit)"},
    {.name = "qos-burst",
     .kind = OptionKind::seconds,
     .help = "seconds of each QoS limit an idle export may use at once (default 1)",
     .min = 0.01,
     .max = 3600},
};

}  // namespace

std::span<const OptionSpec> QosLimits::options() { return kOptions; }

QosLimits QosLimits::take_from(Options& options) {
  QosLimits q;
  if (auto v = options.number(kOptions[0])) q.read_iops = *v;
  if (auto v = options.number(kOptions[1])) q.write_iops = *v;
  if (auto v = options.size(kOptions[2])) q.read_bps = *v;
  if (auto v = options.size(kOptions[3])) q.write_bps = *v;
  if (auto v = options.seconds(kOptions[4])) q.burst = *v;
  return q;
}

std::string QosLimits::to_options() const {
  char burst_text[32];
  std::snprintf(burst_text, sizeof burst_text, "%g", static_cast<double>(burst.count()) / 1000.0);
  return "qos-read-iops=" + std::to_string(read_iops) + ",qos-write-iops=" + std::to_string(write_iops) +
         ",qos-read-bps=" + std::to_string(read_bps) + ",qos-write-bps=" + std::to_string(write_bps) +
         ",qos-burst=" + burst_text;
}

QosLimits QosLimits::from_options(std::string_view text, const std::string& where) {
  std::map<std::string, std::string> values;
  for (size_t pos = 0; pos < text.size();) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string_view item = text.substr(pos, comma - pos);
    const size_t eq = item.find('=');
    values[std::string(item.substr(0, eq))] = eq == std::string_view::npos ? "" : std::string(item.substr(eq + 1));
    pos = comma + 1;
  }
  Options options(values, where);
  QosLimits q = take_from(options);
  options.finish();
  return q;
}

struct QosLayer::Waiter {
  uint64_t bytes = 0;
  Clock::time_point arrived;
  Clock::time_point ready;  // under mutex_
  // Made by wait_turn on the request's executor (under mutex_): until then
  // set_limits only moves `ready`, which wait_turn reads before it sleeps.
  std::optional<boost::asio::steady_timer> timer;
};

QosLayer::QosLayer(std::unique_ptr<BlockDevice> next, QosLimits limits)
    : Layer(std::move(next)), limits_(limits) {
  const auto now = Clock::now();
  configure(read_, limits.read_iops, limits.read_bps, now, false);
  configure(write_, limits.write_iops, limits.write_bps, now, false);
}

void QosLayer::configure(Class& c, uint64_t iops, uint64_t bps, Clock::time_point now, bool keep_level) {
  const double burst = std::chrono::duration<double>(limits_.burst).count();
  // A bucket holds at least one operation, or one byte: a tiny burst still lets requests through.
  const double ops_capacity = std::max(1.0, static_cast<double>(iops) * burst);
  const double bytes_capacity = std::max(1.0, static_cast<double>(bps) * burst);
  if (keep_level) {
    c.ops.reconfigure(static_cast<double>(iops), ops_capacity, now);
    c.bytes.reconfigure(static_cast<double>(bps), bytes_capacity, now);
  } else {
    c.ops.configure(static_cast<double>(iops), ops_capacity, now);
    c.bytes.configure(static_cast<double>(bps), bytes_capacity, now);
  }
  c.limited.store(iops != 0 || bps != 0, std::memory_order_release);
}

void QosLayer::set_limits(const QosLimits& limits) {
  std::lock_guard lock(mutex_);
  limits_ = limits;
  const auto now = Clock::now();
  configure(read_, limits.read_iops, limits.read_bps, now, true);
  configure(write_, limits.write_iops, limits.write_bps, now, true);
  // Requests already waiting are scheduled again in their order under the
  // new limits, from an empty bucket (they waited, so it was empty).
  for (Class* c : {&read_, &write_}) {
    if (c->queue.empty()) continue;
    c->ops.drain(now);
    c->bytes.drain(now);
    for (auto& w : c->queue) {
      if (w->ready <= now) continue;  // due already, about to go: not scheduled again
      const auto before = w->ready;
      w->ready = reserve(*c, w->bytes, now);
      if (w->ready < before && w->timer)  // earlier than its timer: wake it on its own executor
        boost::asio::post(w->timer->get_executor(), [w] { w->timer->cancel(); });
    }
    if (!c->limited) {  // the limit is gone: nothing owed any more
      c->ops.configure(0, 0, now);
      c->bytes.configure(0, 0, now);
    }
  }
}

QosLimits QosLayer::limits() const {
  std::lock_guard lock(mutex_);
  return limits_;
}

QosStats QosLayer::stats() const {
  std::lock_guard lock(mutex_);
  QosStats s;
  s.limits = limits_;
  s.read = read_.stats;
  s.read.queued = read_.queue.size();
  s.write = write_.stats;
  s.write.queued = write_.queue.size();
  return s;
}

QosLayer::Clock::time_point QosLayer::reserve(Class& c, uint64_t bytes, Clock::time_point now) {
  const double cost = static_cast<double>(bytes);
  const auto at = std::max(c.ops.ready_at(1, now), c.bytes.ready_at(cost, now));
  c.ops.take(1, at);
  c.bytes.take(cost, at);
  return at;
}

std::shared_ptr<QosLayer::Waiter> QosLayer::reserve_or_queue(Class& c, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  const auto now = Clock::now();
  const auto at = reserve(c, bytes, now);
  // Within the limits: no wait. Its start is still after every earlier
  // reservation (the buckets stand at the latest one), so FIFO holds.
  if (at <= now) return nullptr;
  auto w = std::make_shared<Waiter>();
  w->bytes = bytes;
  w->arrived = now;
  w->ready = at;
  c.queue.push_back(w);
  ++c.stats.delayed;
  return w;
}

Task<void> QosLayer::wait_turn(Class& c, std::shared_ptr<Waiter> w) {
  const auto ex = co_await boost::asio::this_coro::executor;
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      const auto now = Clock::now();
      if (w->ready <= now) {
        c.queue.erase(std::find(c.queue.begin(), c.queue.end(), w));
        c.stats.delay_seconds += std::chrono::duration<double>(now - w->arrived).count();
        break;
      }
      if (!w->timer) w->timer.emplace(ex);
      w->timer->expires_at(w->ready);
    }
    // Woken at its time, or earlier by set_limits (operation_aborted): look again.
    co_await w->timer->async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
}

Task<std::error_code> QosLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  if (read_.limited.load(std::memory_order_acquire))
    if (auto w = reserve_or_queue(read_, buf.size())) co_await wait_turn(read_, std::move(w));
  co_return co_await next().read(buf, offset, flags);
}

Task<std::error_code> QosLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  if (write_.limited.load(std::memory_order_acquire))
    if (auto w = reserve_or_queue(write_, buf.size())) co_await wait_turn(write_, std::move(w));
  co_return co_await next().write(buf, offset, flags);
}

Task<std::error_code> QosLayer::trim(ByteRange range, IoFlags flags) {
  if (write_.limited.load(std::memory_order_acquire))
    if (auto w = reserve_or_queue(write_, 0)) co_await wait_turn(write_, std::move(w));
  co_return co_await next().trim(range, flags);
}

Task<std::error_code> QosLayer::zero(ByteRange range, IoFlags flags) {
  if (write_.limited.load(std::memory_order_acquire))
    if (auto w = reserve_or_queue(write_, 0)) co_await wait_turn(write_, std::move(w));
  co_return co_await next().zero(range, flags);
}

Task<std::error_code> QosLayer::prefetch(ByteRange range) {
  if (read_.limited.load(std::memory_order_acquire))
    if (auto w = reserve_or_queue(read_, 0)) co_await wait_turn(read_, std::move(w));
  co_return co_await next().prefetch(range);
}

}  // namespace blockway::core
