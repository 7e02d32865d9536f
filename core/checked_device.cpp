#include "core/checked_device.hpp"

#include "core/logging.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <memory>

namespace blockway::core {
namespace {

constexpr uint32_t kValidWriteFlags = kFua;
constexpr uint32_t kValidZeroFlags = kFua | kNoHole | kFastZero;
constexpr size_t kZeroChunk = 1u << 20;  // emulated write-zeroes and prefetch step

// One page-aligned buffer of zeroes shared by every emulated write-zeroes.
std::span<const std::byte> zero_buffer() {
  alignas(4096) static const std::array<std::byte, kZeroChunk> zeroes{};
  return zeroes;
}

bool is_unsupported(std::error_code ec) {
  return ec == std::errc::operation_not_supported || ec == std::errc::not_supported ||
         ec == std::errc::function_not_supported;
}

}  // namespace

CheckedDevice::CheckedDevice(std::unique_ptr<BlockDevice> inner, bool export_read_only)
    : Layer(std::move(inner)),
      geometry_(next().geometry()),
      size_(geometry_.size),
      inner_caps_(next().capabilities()) {
  geometry_.min_block = std::max<uint32_t>(geometry_.min_block, 1);
  geometry_.max_transfer = std::max<uint32_t>(geometry_.max_transfer, geometry_.min_block);
  caps_ = inner_caps_;
  caps_.read_only = inner_caps_.read_only || export_read_only;
  if (caps_.fua == Support::none && inner_caps_.flush == Support::native)
    caps_.fua = Support::emulate;
  if (caps_.zero == Support::none) caps_.zero = Support::emulate;
  if (caps_.extents == Support::none) caps_.extents = Support::emulate;
  if (caps_.prefetch == Support::none) caps_.prefetch = Support::emulate;
  if (caps_.read_only) {
    caps_.trim = Support::none;
    caps_.zero = Support::none;
  }
}

Capabilities CheckedDevice::capabilities() const noexcept {
  if (holds_.load(std::memory_order_acquire) == 0) return caps_;
  Capabilities c = caps_;
  c.read_only = true;
  c.trim = c.zero = Support::none;
  return c;
}

void CheckedDevice::add_read_only_hold(const std::string& reason) {
  std::lock_guard lock(hold_mutex_);
  hold_reason_ = reason;
  hold_logged_.store(false, std::memory_order_relaxed);
  holds_.fetch_add(1, std::memory_order_acq_rel);
}

void CheckedDevice::drop_read_only_hold() noexcept { holds_.fetch_sub(1, std::memory_order_acq_rel); }

bool CheckedDevice::refuses_writes() noexcept {
  if (caps_.read_only) return true;
  if (holds_.load(std::memory_order_acquire) == 0) return false;
  if (!hold_logged_.exchange(true, std::memory_order_relaxed)) {
    try {
      std::lock_guard lock(hold_mutex_);
      logger("export")->warn("refused a write to {}: {}", describe(), hold_reason_);
    } catch (...) {  // a log line is not worth a crash
    }
  }
  return true;
}

void CheckedDevice::begin(Request& r) noexcept {
  r.start = IoTrace::Clock::now();
  if (tracing_.load(std::memory_order_relaxed)) [[unlikely]] {
    r.traced = true;
    // Only reads ask the cache whether it holds the data.
    if (r.op == IoOp::read || r.op == IoOp::prefetch) current_request_note = &r.note;
  }
}

std::error_code CheckedDevice::finish(Request& r, std::error_code ec) noexcept {
  const auto end = IoTrace::Clock::now();
  if (ec) stats_.count_error(r.op);
  if (r.accepted)
    stats_.observe(r.op,
                   static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(end - r.start).count()));
  if (r.traced) [[unlikely]] {
    if (current_request_note == &r.note) current_request_note = nullptr;  // nobody below took it
    std::lock_guard lock(trace_mutex_);
    if (trace_) trace_->record(r.start, end, r.op, r.offset, r.length, r.note.cache, ec.value());
  }
  return ec;
}

void CheckedDevice::attach_trace(std::shared_ptr<IoTrace> trace) {
  std::lock_guard lock(trace_mutex_);
  trace_ = std::move(trace);
  tracing_.store(trace_ != nullptr, std::memory_order_relaxed);
}

void CheckedDevice::detach_trace(const std::shared_ptr<IoTrace>& trace) {
  std::lock_guard lock(trace_mutex_);
  if (trace_ != trace) return;  // a newer trace replaced it
  trace_.reset();
  tracing_.store(false, std::memory_order_relaxed);
}

void CheckedDevice::grow(uint64_t new_size) noexcept {
  uint64_t size = size_.load(std::memory_order_relaxed);
  while (size < new_size && !size_.compare_exchange_weak(size, new_size, std::memory_order_acq_rel)) {
  }
}

std::error_code CheckedDevice::check_range(ByteRange r, int beyond_end_error) const noexcept {
  const uint64_t size = size_.load(std::memory_order_acquire);
  if (r.length > size || r.offset > size - r.length) return errno_code(beyond_end_error);
  // A range that ends at the image's end may end off the grid: the final
  // block of an image whose size is not a multiple of min_block is partial,
  // and reaching it takes such a request (whether the device takes it is the
  // device's answer).
  if (r.offset % geometry_.min_block != 0 ||
      (r.length % geometry_.min_block != 0 && r.end() != size))
    return errno_code(EINVAL);
  return {};
}

Task<std::error_code> CheckedDevice::read(std::span<std::byte> buf, uint64_t offset,
                                          IoFlags flags) {
  Request r{IoOp::read, offset, buf.size()};
  begin(r);
  if (auto ec = check_range({offset, buf.size()}, EINVAL)) co_return finish(r, ec);
  if (flags & ~kFua) co_return finish(r, errno_code(EINVAL));  // FUA on a read is harmless
  accept(r);
  while (!buf.empty()) {
    const size_t n = std::min<size_t>(buf.size(), geometry_.max_transfer);
    if (r.traced) [[unlikely]]
      current_request_note = &r.note;  // each piece tells the cache layer it is part of this request
    if (auto ec = co_await next().read(buf.first(n), offset, 0)) co_return finish(r, ec);
    buf = buf.subspan(n);
    offset += n;
  }
  co_return finish(r, {});
}

Task<std::error_code> CheckedDevice::finish_fua(std::error_code ec, IoFlags flags) {
  if (ec || !(flags & kFua) || inner_caps_.fua == Support::native) co_return ec;
  if (inner_caps_.flush == Support::native) co_return co_await next().flush();
  co_return ec;  // nothing below can be made more durable than it is
}

Task<std::error_code> CheckedDevice::write_split(std::span<const std::byte> buf, uint64_t offset,
                                                 IoFlags flags) {
  const IoFlags pass = inner_caps_.fua == Support::native ? (flags & kFua) : 0;
  while (!buf.empty()) {
    const size_t n = std::min<size_t>(buf.size(), geometry_.max_transfer);
    if (auto ec = co_await next().write(buf.first(n), offset, pass)) co_return ec;
    buf = buf.subspan(n);
    offset += n;
  }
  co_return co_await finish_fua({}, flags);
}

Task<std::error_code> CheckedDevice::write(std::span<const std::byte> buf, uint64_t offset,
                                           IoFlags flags) {
  Request r{IoOp::write, offset, buf.size()};
  begin(r);
  if (refuses_writes()) co_return finish(r, errno_code(EPERM));
  if (auto ec = check_range({offset, buf.size()}, ENOSPC)) co_return finish(r, ec);
  if (flags & ~kValidWriteFlags) co_return finish(r, errno_code(EINVAL));
  accept(r);
  co_return finish(r, co_await write_split(buf, offset, flags));
}

Task<std::error_code> CheckedDevice::flush() {
  Request r{IoOp::flush, 0, 0};
  begin(r);
  accept(r);
  if (inner_caps_.flush == Support::none) co_return finish(r, {});  // nothing is volatile
  co_return finish(r, co_await next().flush());
}

Task<std::error_code> CheckedDevice::trim(ByteRange range, IoFlags flags) {
  Request r{IoOp::trim, range.offset, range.length};
  begin(r);
  if (refuses_writes()) co_return finish(r, errno_code(EPERM));
  if (auto ec = check_range(range, ENOSPC)) co_return finish(r, ec);
  if (flags & ~kFua) co_return finish(r, errno_code(EINVAL));
  accept(r);
  if (caps_.trim == Support::none || range.length == 0) co_return finish(r, {});  // advisory
  auto ec = co_await next().trim(range, inner_caps_.fua == Support::native ? flags : 0);
  if (is_unsupported(ec)) co_return finish(r, {});
  co_return finish(r, co_await finish_fua(ec, flags));
}

Task<std::error_code> CheckedDevice::write_zeroes_by_writing(ByteRange range, IoFlags flags) {
  const auto zeroes = zero_buffer();
  const uint64_t step = std::min<uint64_t>(zeroes.size(), geometry_.max_transfer);
  for (uint64_t done = 0; done < range.length;) {
    const uint64_t n = std::min(step, range.length - done);
    if (auto ec = co_await next().write(zeroes.first(n), range.offset + done, 0)) co_return ec;
    done += n;
  }
  // The pieces went down without FUA, so a FUA request needs a real flush.
  if ((flags & kFua) && inner_caps_.flush == Support::native) co_return co_await next().flush();
  co_return std::error_code{};
}

Task<std::error_code> CheckedDevice::zero(ByteRange range, IoFlags flags) {
  Request r{IoOp::zero, range.offset, range.length};
  begin(r);
  if (refuses_writes()) co_return finish(r, errno_code(EPERM));
  if (auto ec = check_range(range, ENOSPC)) co_return finish(r, ec);
  if (flags & ~kValidZeroFlags) co_return finish(r, errno_code(EINVAL));
  accept(r);
  if (range.length == 0) co_return finish(r, {});
  if (inner_caps_.zero == Support::native) {
    const IoFlags pass = flags & (kNoHole | kFastZero | (inner_caps_.fua == Support::native ? kFua : 0));
    auto ec = co_await next().zero(range, pass);
    if (!is_unsupported(ec)) co_return finish(r, co_await finish_fua(ec, flags));
  }
  // Falling back to writing zeroes is exactly what FAST_ZERO forbids.
  if (flags & kFastZero) co_return finish(r, errno_code(ENOTSUP));
  co_return finish(r, co_await write_zeroes_by_writing(range, flags));
}

Task<std::error_code> CheckedDevice::block_status(ByteRange range, ExtentList& out) {
  Request r{IoOp::block_status, range.offset, range.length};
  begin(r);
  if (range.length == 0) co_return finish(r, errno_code(EINVAL));
  if (auto ec = check_range(range, EINVAL)) co_return finish(r, ec);
  accept(r);
  out.clear();
  if (inner_caps_.extents == Support::native) {
    ExtentList raw;
    if (auto ec = co_await next().block_status(range, raw)) co_return finish(r, ec);
    // Clip to the request, drop empty extents, merge neighbours with equal flags.
    uint64_t covered = 0;
    for (const Extent& e : raw) {
      if (covered >= range.length) break;
      const uint64_t len = std::min(e.length, range.length - covered);
      if (len == 0) continue;
      if (!out.empty() && out.back().flags == e.flags)
        out.back().length += len;
      else
        out.push_back({len, e.flags});
      covered += len;
    }
  }
  if (out.empty()) out.push_back({range.length, 0});  // "data, contents unknown" is always true
  co_return finish(r, {});
}

Task<std::error_code> CheckedDevice::prefetch(ByteRange range) {
  Request r{IoOp::prefetch, range.offset, range.length};
  begin(r);
  if (auto ec = check_range(range, EINVAL)) co_return finish(r, ec);
  accept(r);
  if (range.length == 0) co_return finish(r, {});
  if (inner_caps_.prefetch == Support::native) co_return finish(r, co_await next().prefetch(range));
  // Emulation: read and discard, so that the layers below see (and cache) the data.
  const uint64_t step = std::min<uint64_t>(kZeroChunk, geometry_.max_transfer);
  auto scratch = std::make_unique_for_overwrite<std::byte[]>(step);
  for (uint64_t done = 0; done < range.length;) {
    const uint64_t n = std::min(step, range.length - done);
    if (r.traced) [[unlikely]]
      current_request_note = &r.note;
    if (auto ec = co_await next().read({scratch.get(), n}, range.offset + done, 0))
      co_return finish(r, ec);
    done += n;
  }
  co_return finish(r, {});
}

}  // namespace blockway::core
