#include "core/block_size_layer.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>

namespace blockway::core {

// Orders an aligned write (or zeroing) against RMWs. The cheap case, no RMW
// pending: the write counts itself in aligned_unlocked_ and goes ahead
// without the lock. Otherwise it queues on edge_lock_ behind the pending
// RMWs. An RMW, holding edge_lock_, waits until aligned_unlocked_ is zero.
// Both sides increment their own counter before reading the other's
// (sequentially consistent), so at least one of them sees the other.
class BlockSizeLayer::AlignedWrite {
 public:
  // No coroutine frame on the way: the lock, when needed, is taken with wait().
  explicit AlignedWrite(BlockSizeLayer& layer) noexcept : layer_(layer) {
    layer.aligned_unlocked_.fetch_add(1, std::memory_order_seq_cst);
    if (layer.rmw_pending_.load(std::memory_order_seq_cst) == 0) {
      counted_ = true;
      return;
    }
    layer.aligned_unlocked_.fetch_sub(1, std::memory_order_release);
    must_wait_ = true;
  }
  [[nodiscard]] bool must_wait() const noexcept { return must_wait_; }
  // Queues behind the pending RMWs, then counts itself like a write that
  // went ahead and lets the lock go at once: the lock is only a barrier (an
  // RMW queued after it waits for the count), so writes that waited still
  // run in parallel with each other.
  Task<void> wait() {
    auto guard = co_await layer_.edge_lock_.lock();
    layer_.aligned_unlocked_.fetch_add(1, std::memory_order_seq_cst);
    counted_ = true;
  }
  AlignedWrite(const AlignedWrite&) = delete;
  AlignedWrite& operator=(const AlignedWrite&) = delete;
  ~AlignedWrite() {
    if (counted_) layer_.aligned_unlocked_.fetch_sub(1, std::memory_order_release);
  }

 private:
  BlockSizeLayer& layer_;
  bool counted_ = false;
  bool must_wait_ = false;
};

// Holds edge_lock_ for an RMW, once no aligned write that went ahead without
// the lock is in flight any more (see AlignedWrite).
class BlockSizeLayer::EdgeLock {
 public:
  static Task<EdgeLock> lock(BlockSizeLayer& layer) {
    layer.rmw_pending_.fetch_add(1, std::memory_order_seq_cst);
    EdgeLock held(&layer);  // counted from here: any exit below undoes it
    auto guard = co_await layer.edge_lock_.lock();
    held.guard_.emplace(std::move(guard));
    if (layer.aligned_unlocked_.load(std::memory_order_seq_cst) != 0) {
      // Aligned writes started before this RMW was counted: they take a
      // device round trip at most. Later ones queue behind the lock.
      const auto ex = co_await boost::asio::this_coro::executor;
      boost::asio::steady_timer timer(ex);
      // 100 us first, doubling up to 10 ms: a write stuck on a slow or
      // reconnecting remote is not polled 10,000 times a second.
      auto pause = std::chrono::microseconds(100);
      while (layer.aligned_unlocked_.load(std::memory_order_seq_cst) != 0) {
        timer.expires_after(pause);
        co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(10));
      }
    }
    co_return held;
  }
  EdgeLock(EdgeLock&& o) noexcept : layer_(std::exchange(o.layer_, nullptr)), guard_(std::move(o.guard_)) {
    o.guard_.reset();
  }
  EdgeLock& operator=(EdgeLock&&) = delete;
  ~EdgeLock() {
    guard_.reset();  // the next in line may start
    if (layer_) layer_->rmw_pending_.fetch_sub(1, std::memory_order_release);
  }

 private:
  explicit EdgeLock(BlockSizeLayer* layer) : layer_(layer) {}
  BlockSizeLayer* layer_;
  std::optional<AsyncMutex::Guard> guard_;
};

BlockSizeLayer::BlockSizeLayer(std::shared_ptr<BlockDevice> next, std::string label,
                               std::shared_ptr<spdlog::logger> log)
    : next_(std::move(next)),
      label_(std::move(label)),
      log_(log ? std::move(log) : logger("block-size")),
      geometry_(next_->geometry()),
      caps_(next_->capabilities()) {
  size_ = geometry_.size;
  block_ = std::max<uint32_t>(geometry_.min_block, 1);
  geometry_.min_block = 1;
  geometry_.preferred_block = std::max(geometry_.preferred_block, block_);
}

BlockSizeLayer::~BlockSizeLayer() = default;

Geometry BlockSizeLayer::geometry() const noexcept { return geometry_; }

std::error_code BlockSizeLayer::check(uint64_t offset, uint64_t length, int beyond_end_error) const noexcept {
  if (length > size_ || offset > size_ - length) return errno_code(beyond_end_error);
  return {};
}

bool BlockSizeLayer::tail_refused(uint64_t end, std::error_code ec) noexcept {
  if (ec.value() != EINVAL || end <= partial_tail()) return false;
  if (!tail_refused_.exchange(true, std::memory_order_relaxed)) {
    try {
      log_->error("{}: the device refuses the final {} bytes (the size {} is not a multiple of its "
                  "{}-byte blocks, and it takes whole blocks only): reads and writes there fail with EIO",
                  label_, size_ - partial_tail(), size_, block_);
    } catch (...) {
    }
  }
  return true;
}

Task<std::error_code> BlockSizeLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  if (on_grid(offset, buf.size())) return next_->read(buf, offset, flags);
  return read_widened(buf, offset, flags);
}

// A read that reaches into a partial final block the device refuses fails
// with EIO, not short: a short read would be taken for the end of the image.
Task<std::error_code> BlockSizeLayer::read_widened(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  if (auto ec = check(offset, buf.size(), EINVAL)) co_return ec;
  if (buf.empty()) co_return std::error_code{};
  const uint64_t first = offset / block_ * block_;
  const uint64_t last = std::min((offset + buf.size() + block_ - 1) / block_ * block_, size_);
  const auto bytes = static_cast<size_t>(last - first);
  IoBuffer widened(bytes);
  std::error_code ec = co_await next_->read(widened.span().first(bytes), first, flags);
  if (ec && tail_refused(last, ec)) ec = errno_code(EIO);
  if (!ec) std::memcpy(buf.data(), widened.data() + (offset - first), buf.size());
  co_return ec;
}

Task<std::error_code> BlockSizeLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  if (block_ == 1) return next_->write(buf, offset, flags);  // nothing to order
  if (on_grid(offset, buf.size())) return write_aligned(buf, offset, flags);
  return write_strict(buf, offset, flags);
}

Task<BlockSizeLayer::Written> BlockSizeLayer::write_some(std::span<const std::byte> buf, uint64_t offset,
                                                         IoFlags flags) {
  if (!on_grid(offset, buf.size())) co_return co_await write_unaligned(buf, offset, flags);
  // write_aligned() inline: one coroutine frame fewer on the hot path.
  std::error_code ec;
  if (block_ == 1) {
    ec = co_await next_->write(buf, offset, flags);
  } else {
    AlignedWrite pass(*this);
    if (pass.must_wait()) co_await pass.wait();
    ec = co_await next_->write(buf, offset, flags);
  }
  co_return Written{ec, ec ? 0 : buf.size()};
}

Task<std::error_code> BlockSizeLayer::write_aligned(std::span<const std::byte> buf, uint64_t offset,
                                                    IoFlags flags) {
  AlignedWrite pass(*this);
  if (pass.must_wait()) co_await pass.wait();
  co_return co_await next_->write(buf, offset, flags);
}

Task<std::error_code> BlockSizeLayer::write_strict(std::span<const std::byte> buf, uint64_t offset,
                                                   IoFlags flags) {
  const Written w = co_await write_unaligned(buf, offset, flags);
  if (!w.ec && w.written < buf.size()) co_return errno_code(EIO);  // the final block was refused
  co_return w.ec;
}

Task<BlockSizeLayer::Written> BlockSizeLayer::write_unaligned(std::span<const std::byte> buf, uint64_t offset,
                                                              IoFlags flags) {
  if (caps_.read_only) co_return Written{errno_code(EPERM)};
  if (auto ec = check(offset, buf.size(), ENOSPC)) co_return Written{ec};
  if (flags & ~kFua) co_return Written{errno_code(EINVAL)};
  if (buf.empty()) co_return Written{};
  const uint64_t end = offset + buf.size();
  std::error_code ec;
  size_t written = buf.size();
  auto guard = co_await EdgeLock::lock(*this);
  // The partial final block goes last, on its own: a device that refuses
  // it still takes the rest, and the write is short up to it.
  const uint64_t split = std::clamp(partial_tail(), offset, end);
  if (split > offset) ec = co_await write_off_grid(offset, split - offset, buf.data(), flags, 0);
  if (!ec && end > split) {
    ec = co_await write_off_grid(split, end - split, buf.data() + (split - offset), flags, 0);
    if (ec && tail_refused(end, ec)) {
      ec = split > offset ? std::error_code{} : errno_code(EIO);
      written = static_cast<size_t>(split - offset);
    }
  }
  co_return Written{ec, ec ? 0 : written};
}

// One block of the grid, read, patched at [from, from + len) with src
// (nullptr: zeroes), and written back. The caller holds edge_lock_.
Task<std::error_code> BlockSizeLayer::patch_block(uint64_t block, uint64_t from, size_t len, const std::byte* src,
                                                  IoFlags flags) {
  // The final block of an image whose size is off the grid ends at the image's end.
  const auto bytes = static_cast<size_t>(std::min<uint64_t>(block_, size_ - block));
  IoBuffer buf(bytes);
  if (from != block || len != bytes) {  // a patch of all of it needs no read
    if (auto ec = co_await next_->read(buf.span().first(bytes), block, 0)) co_return ec;
  }
  std::byte* at = buf.data() + (from - block);
  if (src)
    std::memcpy(at, src, len);
  else
    std::memset(at, 0, len);
  co_return co_await next_->write(std::span<const std::byte>(buf.data(), bytes), block, flags);
}

// Writes [offset, offset + length) where offset or length is off the grid:
// the partial blocks at either end are read, patched and written back; the
// whole blocks between go down as they are (src: straight from the caller's
// buffer; nullptr: WRITE_ZEROES with zero_flags). The caller holds
// edge_lock_, so RMWs into the same block take turns.
Task<std::error_code> BlockSizeLayer::write_off_grid(uint64_t offset, uint64_t length, const std::byte* src,
                                                     IoFlags flags, IoFlags zero_flags) {
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  std::error_code ec;
  if (offset % block_ != 0) {
    const uint64_t block = offset / block_ * block_;
    const uint64_t stop = std::min(end, block + block_);
    ec = co_await patch_block(block, offset, static_cast<size_t>(stop - offset), src, flags);
    if (ec) co_return ec;
    pos = stop;
  }
  const uint64_t whole_end = std::max(pos, end / block_ * block_);
  if (whole_end > pos) {
    if (src) {
      const std::span<const std::byte> middle(src + (pos - offset), static_cast<size_t>(whole_end - pos));
      ec = co_await next_->write(middle, pos, flags);
    } else {
      ec = co_await next_->zero(ByteRange{pos, whole_end - pos}, zero_flags);
    }
    if (ec) co_return ec;
    pos = whole_end;
  }
  if (pos < end) {  // a partial block at the end; pos is on the grid here
    const std::byte* tail = src ? src + (pos - offset) : nullptr;
    ec = co_await patch_block(pos, pos, static_cast<size_t>(end - pos), tail, flags);
  }
  co_return ec;
}

// Partial blocks at the edges get zeroes written into them (with the
// request's FUA); the whole blocks between are zeroed, or deallocated, by
// the device. FAST_ZERO forbids the slow way, and an RMW is one.
Task<std::error_code> BlockSizeLayer::zero(ByteRange range, IoFlags flags) {
  std::error_code ec;
  if (on_grid(range.offset, range.length)) {
    if (block_ == 1) co_return co_await next_->zero(range, flags);
    AlignedWrite pass(*this);
    if (pass.must_wait()) co_await pass.wait();
    ec = co_await next_->zero(range, flags);
  } else {
    if (caps_.read_only) co_return errno_code(EPERM);
    if (auto e = check(range.offset, range.length, ENOSPC)) co_return e;
    if (flags & ~(kFua | kNoHole | kFastZero)) co_return errno_code(EINVAL);
    if (flags & kFastZero) co_return errno_code(ENOTSUP);
    if (range.length == 0) co_return std::error_code{};
    auto guard = co_await EdgeLock::lock(*this);
    ec = co_await write_off_grid(range.offset, range.length, nullptr, flags & kFua, flags);
  }
  if (ec && tail_refused(range.end(), ec)) ec = errno_code(EIO);
  co_return ec;
}

// Advisory: the whole blocks inside the range, or nothing. (A partial final
// block is left alone: it cannot be inside a range on the grid.)
Task<std::error_code> BlockSizeLayer::trim(ByteRange range, IoFlags flags) {
  if (on_grid(range.offset, range.length)) co_return co_await next_->trim(range, flags);
  if (caps_.read_only) co_return errno_code(EPERM);
  if (auto ec = check(range.offset, range.length, ENOSPC)) co_return ec;
  if (flags & ~kFua) co_return errno_code(EINVAL);
  const uint64_t first = (range.offset + block_ - 1) / block_ * block_;
  const uint64_t last = range.end() / block_ * block_;
  if (last <= first) co_return std::error_code{};
  co_return co_await next_->trim(ByteRange{first, last - first}, flags);
}

// Asked from the grid, and cut back to the range: the extents describe
// bytes from range.offset on, as the interface promises.
Task<std::error_code> BlockSizeLayer::block_status(ByteRange range, ExtentList& out) {
  if (on_grid(range.offset, range.length)) co_return co_await next_->block_status(range, out);
  if (range.length == 0) co_return errno_code(EINVAL);
  if (auto ec = check(range.offset, range.length, EINVAL)) co_return ec;
  const uint64_t first = range.offset / block_ * block_;
  const uint64_t last = std::min((range.end() + block_ - 1) / block_ * block_, size_);
  ExtentList raw;
  std::error_code ec = co_await next_->block_status(ByteRange{first, last - first}, raw);
  if (ec && tail_refused(last, ec)) ec = errno_code(EIO);
  if (ec) co_return ec;
  out.clear();
  uint64_t skip = range.offset - first;
  uint64_t covered = 0;
  for (const Extent& e : raw) {
    if (covered >= range.length) break;
    uint64_t len = e.length;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    len = std::min(len - skip, range.length - covered);
    skip = 0;
    out.push_back({len, e.flags});
    covered += len;
  }
  // The device described less than the block the range starts in: the rest
  // of that block is "data, contents unknown", which is always true.
  if (out.empty()) out.push_back({std::min(first + block_, range.end()) - range.offset, 0});
  co_return std::error_code{};
}

Task<std::error_code> BlockSizeLayer::prefetch(ByteRange range) {
  if (on_grid(range.offset, range.length)) co_return co_await next_->prefetch(range);
  if (auto ec = check(range.offset, range.length, EINVAL)) co_return ec;
  if (range.length == 0) co_return std::error_code{};
  const uint64_t first = range.offset / block_ * block_;
  const uint64_t last = std::min((range.end() + block_ - 1) / block_ * block_, size_);
  co_return co_await next_->prefetch(ByteRange{first, last - first});
}

}  // namespace blockway::core
