// BlockSizeLayer: requests of any size and alignment on a device that takes
// only whole blocks of its min_block (an NBD remote with a 4096-byte minimum,
// an iSCSI LUN's sectors). A front end whose clients send bytes, not blocks
// (FUSE), puts it on top of an export's device when min_block > 1.
//
// What it does with a request off the device's grid:
// - read: reads the blocks that cover it, copies out the part asked for;
// - write, zero: the partial blocks at either end are read, patched (with
//   the data or with zeroes) and written back (read-modify-write, RMW); the
//   whole blocks between go down as they are, straight from the caller's
//   buffer (zero: as one WRITE_ZEROES);
// - trim (advisory): shrinks to the whole blocks inside, if any;
// - block_status, prefetch: widened to the grid (block status is cut back
//   to the range asked for).
// Requests on the grid pass through unchanged, without a copy.
//
// The rules below it are CheckedDevice's: every request it sends starts on
// the grid and has a length on it, except one that ends at the image's end.
// The final block of an image whose size is off the grid is partial, and a
// request from the grid to the image's end is the only way to it; a device
// that refuses that request (EINVAL: nbdkit's blocksize-policy) makes reads,
// writes and zeroes that reach into it fail with EIO (logged once), and
// write_some() is then short up to it. Requests it refuses itself get
// CheckedDevice's answers (beyond the end: EINVAL, for writes ENOSPC; a
// read-only device: EPERM; unknown flags: EINVAL), before any RMW starts.
//
// Ordering: RMWs take turns under one FIFO lock per layer (edge_lock_), so
// two unaligned writes into one block cannot undo each other, and requests
// of one caller are RMW'd in the order they arrived. Aligned writes and
// zeroes take no lock while no RMW is pending; while one is, they queue
// behind it, and an RMW first waits for the aligned writes in flight
// (AlignedWrite and EdgeLock in the .cpp): otherwise an RMW that read a block
// before an aligned write of it landed would write the old bytes back after
// it. The lock is per layer (per image), not per block: RMWs are rare
// (off-grid requests). Reads take no part: a read beside an RMW sees the
// block before or after it.
//
// Thread model: like every BlockDevice, called from any number of threads at
// once. State: edge_lock_ (an AsyncMutex, which suspends coroutines, never
// threads) and two atomic counters; geometry and capabilities are read once.
#pragma once

#include "core/async_mutex.hpp"
#include "core/block_device.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace spdlog {
class logger;
}

namespace blockway::core {

class BlockSizeLayer final : public BlockDevice {
 public:
  // A BlockDevice, not a Layer: a front end puts it on an export's device,
  // which the export shares (a stack builder may hand over a unique_ptr).
  // `label` names the image in the log ("FUSE: vm1"); `log` is the logger to
  // use (default: "block-size").
  BlockSizeLayer(std::shared_ptr<BlockDevice> next, std::string label,
                 std::shared_ptr<spdlog::logger> log = nullptr);
  ~BlockSizeLayer() override;

  // The device's, with min_block 1 (and preferred_block at least the
  // device's min_block).
  [[nodiscard]] Geometry geometry() const noexcept override;
  [[nodiscard]] Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override { return next_->describe(); }
  // The device's min_block: requests off this grid are widened or RMW'd.
  [[nodiscard]] uint32_t block() const noexcept { return block_; }
  [[nodiscard]] bool on_grid(uint64_t offset, uint64_t length) const noexcept {
    return block_ == 1 || (offset % block_ == 0 && length % block_ == 0);
  }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) override;
  Task<std::error_code> flush() override { return next_->flush(); }
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override;
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override;
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override;
  Task<std::error_code> prefetch(ByteRange range) override;
  Task<void> close() override { return next_->close(); }

  // write() for a front end that can answer a short write (a FUSE write):
  // when the device refuses the image's final, partial block, the bytes
  // before it are still written and `written` says how many (then an error
  // only if that is none). Otherwise as write(): `written` is the whole
  // request on success, 0 on an error.
  struct Written {
    std::error_code ec;
    size_t written = 0;
  };
  Task<Written> write_some(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);

 private:
  class AlignedWrite;
  class EdgeLock;

  // Where the final block starts when it is partial; the image's size when
  // there is none.
  [[nodiscard]] uint64_t partial_tail() const noexcept { return size_ / block_ * block_; }
  [[nodiscard]] std::error_code check(uint64_t offset, uint64_t length, int beyond_end_error) const noexcept;
  // Did the device refuse the final, partial block for a request that
  // reached `end`? Logs it the first time.
  bool tail_refused(uint64_t end, std::error_code ec) noexcept;

  Task<std::error_code> read_widened(std::span<std::byte> buf, uint64_t offset, IoFlags flags);
  Task<std::error_code> write_aligned(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);
  Task<std::error_code> write_strict(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);
  Task<Written> write_unaligned(std::span<const std::byte> buf, uint64_t offset, IoFlags flags);
  Task<std::error_code> patch_block(uint64_t block, uint64_t from, size_t len, const std::byte* src,
                                    IoFlags flags);
  Task<std::error_code> write_off_grid(uint64_t offset, uint64_t length, const std::byte* src, IoFlags flags,
                                       IoFlags zero_flags);

  std::shared_ptr<BlockDevice> next_;
  std::string label_;
  std::shared_ptr<spdlog::logger> log_;
  uint64_t size_ = 0;
  uint32_t block_ = 1;
  Geometry geometry_;
  Capabilities caps_;
  std::atomic<bool> tail_refused_{false};  // logged already
  // Held over every RMW (and the rest of its request). Aligned writes take it
  // only while an RMW is pending, and let it go at once (see AlignedWrite).
  AsyncMutex edge_lock_;
  // RMWs waiting for or holding edge_lock_, and aligned writes in flight
  // without it: read by every aligned write, so they share a cache line.
  alignas(64) std::atomic<uint32_t> rmw_pending_{0};
  std::atomic<uint32_t> aligned_unlocked_{0};
};

}  // namespace blockway::core
