// CheckedDevice: the single checkpoint at the top of every export.
//
// It validates every request (range, alignment, flags, read-only) before any
// lower layer sees it, and emulates in one place what the device below lacks:
// write-zeroes by writing zeroes, FUA by write+flush, block status by one data
// extent, prefetch by read-and-discard, and requests larger than the device's
// max_transfer by splitting. Front ends advertise capabilities() of this
// class, never of the device below.
//
// It also measures: per operation the requests, bytes, errors and latency
// (IoStats, read by `blockway stats` and the metrics endpoint), and, while a
// trace is attached, one record per request (IoTrace).
//
// Thread model: stateless apart from IoStats (atomics) and the attached trace
// (an atomic flag on the data path; a mutex only while tracing); safe to call
// from any number of threads at once, like the device it wraps.
#pragma once

#include "core/block_device.hpp"
#include "core/io_stats.hpp"
#include "core/io_trace.hpp"

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

namespace blockway::core {

class CheckedDevice final : public Layer {
 public:
  // export_read_only forces read-only even where the device is writable.
  CheckedDevice(std::unique_ptr<BlockDevice> inner, bool export_read_only);

  [[nodiscard]] Capabilities capabilities() const noexcept override;
  [[nodiscard]] Geometry geometry() const noexcept override {
    Geometry g = geometry_;
    g.size = size_.load(std::memory_order_acquire);
    return g;
  }
  // The image grew below (a remote resized while served): requests up to
  // new_size pass from now on, and new clients see it. Never shrinks. Any
  // thread.
  void grow(uint64_t new_size) noexcept;

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                              IoFlags flags) override;
  Task<std::error_code> flush() override;
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override;
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override;
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override;
  Task<std::error_code> prefetch(ByteRange range) override;

  [[nodiscard]] const IoStats& stats() const noexcept { return stats_; }

  // Read-only holds: while any is held (the export is the base of clones),
  // writes, trims and zeroes fail with EPERM and capabilities() says
  // read-only; the first refusal of each hold logs `reason`. Any thread.
  void add_read_only_hold(const std::string& reason);
  void drop_read_only_hold() noexcept;
  [[nodiscard]] int read_only_holds() const noexcept { return holds_.load(std::memory_order_acquire); }

  // Records every request from now on into `trace` (replacing one attached
  // before); detach_trace() stops it. Any thread.
  void attach_trace(std::shared_ptr<IoTrace> trace);
  void detach_trace(const std::shared_ptr<IoTrace>& trace);

 private:
  // One request on its way through: what the stats and the trace record.
  struct Request {
    IoOp op;
    uint64_t offset, length;
    IoTrace::Clock::time_point start{};
    bool accepted = false;
    bool traced = false;
    RequestNote note;
  };
  void begin(Request& r) noexcept;  // stamps the start; sets the note if traced
  // The request passed validation and goes down.
  void accept(Request& r) noexcept {
    r.accepted = true;
    stats_.count(r.op, r.length);
  }
  std::error_code finish(Request& r, std::error_code ec) noexcept;
  // True (and logs the reason once) if writes are refused now.
  [[nodiscard]] bool refuses_writes() noexcept;

  // EINVAL (or `beyond_end_error`) unless range lies inside the image and is aligned.
  [[nodiscard]] std::error_code check_range(ByteRange range, int beyond_end_error) const noexcept;
  Task<std::error_code> write_split(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);
  Task<std::error_code> write_zeroes_by_writing(ByteRange range, IoFlags flags);
  Task<std::error_code> finish_fua(std::error_code ec, IoFlags flags);

  Geometry geometry_;  // its size is size_
  std::atomic<uint64_t> size_;
  Capabilities inner_caps_;
  Capabilities caps_;
  IoStats stats_;
  std::atomic<bool> tracing_{false};
  std::mutex trace_mutex_;
  std::shared_ptr<IoTrace> trace_;
  std::atomic<int> holds_{0};
  std::atomic<bool> hold_logged_{false};
  std::mutex hold_mutex_;
  std::string hold_reason_;
};

}  // namespace blockway::core
