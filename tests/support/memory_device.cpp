#include "tests/support/memory_device.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cstring>

namespace blockway::test {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Task;

struct MemoryDevice::Waiter {
  Op op;
  std::shared_ptr<boost::asio::steady_timer> timer;
};

MemoryDevice::MemoryDevice(core::Geometry geometry, core::Capabilities caps)
    : geometry_(geometry), caps_(caps), data_(geometry.size) {}

MemoryDevice::~MemoryDevice() = default;

Task<std::error_code> MemoryDevice::enter(Call call) {
  const auto i = static_cast<size_t>(call.op);
  const auto executor = co_await boost::asio::this_coro::executor;
  std::shared_ptr<Waiter> waiter;
  {
    std::lock_guard lock(mutex_);
    log_.push_back(call);
    counts_[i].fetch_add(1);
    const uint64_t now = active_[i].fetch_add(1) + 1;
    uint64_t seen = max_active_[i].load();
    while (seen < now && !max_active_[i].compare_exchange_weak(seen, now)) {
    }
  }
  while (true) {
    {
      std::lock_guard lock(mutex_);
      if (waiter) std::erase(waiters_, waiter);
      if (!gate_closed_[i]) break;
      waiter = std::make_shared<Waiter>(Waiter{call.op, std::make_shared<boost::asio::steady_timer>(executor)});
      waiters_.push_back(waiter);
    }
    // Woken early by open_gate(); the timeout only guards against a lost wake-up.
    waiter->timer->expires_after(std::chrono::milliseconds(20));
    co_await waiter->timer->async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
  std::lock_guard lock(mutex_);
  if (errors_[i]) co_return errno_code(errors_[i]);
  const uint64_t grid = std::max<uint32_t>(geometry_.min_block, 1);
  const bool ranged = call.op != Op::flush && call.op != Op::prefetch;
  if (refuse_partial_ && ranged && (call.offset % grid != 0 || call.length % grid != 0))
    co_return errno_code(EINVAL);
  co_return std::error_code{};
}

void MemoryDevice::leave(Op op) { active_[static_cast<size_t>(op)].fetch_sub(1); }

Task<std::error_code> MemoryDevice::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  auto ec = co_await enter({Op::read, offset, buf.size(), flags});
  if (!ec) {
    std::lock_guard lock(mutex_);
    if (offset > data_.size() || buf.size() > data_.size() - offset)
      ec = errno_code(EIO);  // CheckedDevice should never let this through
    else
      std::memcpy(buf.data(), data_.data() + offset, buf.size());
  }
  leave(Op::read);
  co_return ec;
}

Task<std::error_code> MemoryDevice::write(std::span<const std::byte> buf, uint64_t offset,
                                          IoFlags flags) {
  auto ec = co_await enter({Op::write, offset, buf.size(), flags});
  if (!ec) {
    std::lock_guard lock(mutex_);
    if (offset > data_.size() || buf.size() > data_.size() - offset)
      ec = errno_code(EIO);
    else
      std::memcpy(data_.data() + offset, buf.data(), buf.size());
  }
  leave(Op::write);
  co_return ec;
}

Task<std::error_code> MemoryDevice::flush() {
  auto ec = co_await enter({Op::flush, 0, 0, 0});
  leave(Op::flush);
  co_return ec;
}

Task<std::error_code> MemoryDevice::trim(ByteRange range, IoFlags flags) {
  return clear(Op::trim, range, flags);
}

Task<std::error_code> MemoryDevice::zero(ByteRange range, IoFlags flags) {
  return clear(Op::zero, range, flags);
}

Task<std::error_code> MemoryDevice::clear(Op op, ByteRange range, IoFlags flags) {
  auto ec = co_await enter({op, range.offset, range.length, flags});
  if (!ec) {
    std::lock_guard lock(mutex_);
    if (range.end() > data_.size())
      ec = errno_code(EIO);
    else
      std::fill_n(data_.begin() + static_cast<std::ptrdiff_t>(range.offset), range.length, std::byte{0});
  }
  leave(op);
  co_return ec;
}

Task<std::error_code> MemoryDevice::block_status(ByteRange range, core::ExtentList& out) {
  auto ec = co_await enter({Op::block_status, range.offset, range.length, 0});
  if (!ec) {
    std::lock_guard lock(mutex_);
    if (extents_)
      out.insert(out.end(), extents_->begin(), extents_->end());
    else
      out.push_back({range.length, 0});
  }
  leave(Op::block_status);
  co_return ec;
}

Task<std::error_code> MemoryDevice::prefetch(ByteRange range) {
  auto ec = co_await enter({Op::prefetch, range.offset, range.length, 0});
  leave(Op::prefetch);
  co_return ec;
}

void MemoryDevice::fail(Op op, int err) {
  std::lock_guard lock(mutex_);
  errors_[static_cast<size_t>(op)] = err;
}

void MemoryDevice::refuse_partial_blocks(bool on) {
  std::lock_guard lock(mutex_);
  refuse_partial_ = on;
}

void MemoryDevice::set_extents(core::ExtentList extents) {
  std::lock_guard lock(mutex_);
  extents_ = std::move(extents);
}

void MemoryDevice::close_gate(Op op) {
  std::lock_guard lock(mutex_);
  gate_closed_[static_cast<size_t>(op)] = true;
}

void MemoryDevice::open_gate(Op op) {
  std::lock_guard lock(mutex_);
  gate_closed_[static_cast<size_t>(op)] = false;
  for (const auto& w : waiters_) {
    if (w->op != op) continue;
    boost::asio::post(w->timer->get_executor(), [t = w->timer] { t->cancel(); });
  }
}

std::vector<Call> MemoryDevice::log() const {
  std::lock_guard lock(mutex_);
  return log_;
}

std::vector<Call> MemoryDevice::log_of(Op op) const {
  std::lock_guard lock(mutex_);
  std::vector<Call> out;
  for (const auto& c : log_)
    if (c.op == op) out.push_back(c);
  return out;
}

void MemoryDevice::clear_log() {
  std::lock_guard lock(mutex_);
  log_.clear();
}

std::vector<std::byte> MemoryDevice::contents(uint64_t offset, uint64_t length) const {
  std::lock_guard lock(mutex_);
  return {data_.begin() + static_cast<std::ptrdiff_t>(offset),
          data_.begin() + static_cast<std::ptrdiff_t>(offset + length)};
}

void MemoryDevice::grow(uint64_t size) {
  std::lock_guard lock(mutex_);
  if (size <= data_.size()) return;
  data_.resize(size);
  geometry_.size = size;
}

void MemoryDevice::fill(uint64_t offset, uint64_t length, std::byte value) {
  std::lock_guard lock(mutex_);
  std::fill_n(data_.begin() + static_cast<std::ptrdiff_t>(offset), length, value);
}

void MemoryDevice::fill_pattern(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mutex_);
  for (uint64_t i = 0; i < length; ++i) data_[offset + i] = pattern_at(offset + i);
}

}  // namespace blockway::test
