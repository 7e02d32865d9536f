// CheckedDevice: the single checkpoint at the top of every export.
//
// It validates every request (range, alignment, flags, read-only) before any
// lower layer sees it, and emulates in one place what the device below lacks:
// write-zeroes by writing zeroes, FUA by write+flush, block status by one data
// extent, prefetch by read-and-discard, and requests larger than the device's
// max_transfer by splitting. Front ends advertise capabilities() of this
// class, never of the device below.
//
// Thread model: stateless apart from IoStats (atomics); safe to call from any
// number of threads at once, like the device it wraps.
#pragma once

#include "core/block_device.hpp"
#include "core/io_stats.hpp"

namespace blockway::core {

class CheckedDevice final : public Layer {
 public:
  // export_read_only forces read-only even where the device is writable.
  CheckedDevice(std::unique_ptr<BlockDevice> inner, bool export_read_only);

  [[nodiscard]] Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] Geometry geometry() const noexcept override { return geometry_; }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                              IoFlags flags) override;
  Task<std::error_code> flush() override;
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override;
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override;
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override;
  Task<std::error_code> prefetch(ByteRange range) override;

  [[nodiscard]] const IoStats& stats() const noexcept { return stats_; }

 private:
  // EINVAL (or `beyond_end_error`) unless range lies inside the image and is aligned.
  [[nodiscard]] std::error_code check_range(ByteRange range, int beyond_end_error) const noexcept;
  Task<std::error_code> write_split(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);
  Task<std::error_code> write_zeroes_by_writing(ByteRange range, IoFlags flags);
  Task<std::error_code> finish_fua(std::error_code ec, IoFlags flags);
  std::error_code counted(std::error_code ec) noexcept {
    if (ec) stats_.count_error();
    return ec;
  }

  Geometry geometry_;
  Capabilities inner_caps_;
  Capabilities caps_;
  IoStats stats_;
};

}  // namespace blockway::core
