// The core interface: one image as seen from the layer above.
//
// Thread model: a BlockDevice is shared by every session of an export, and
// sessions run on different event-loop threads, so every implementation must
// accept concurrent calls from several threads. Each call's buffers belong to
// the caller until its Task completes. Errors are errno values in a
// std::error_code (std::system_category), never exceptions.
#pragma once

#include "core/task.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace blockway::core {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  [[nodiscard]] uint64_t end() const noexcept { return offset + length; }
  friend bool operator==(const ByteRange&, const ByteRange&) = default;
};

// The largest single read or write a device takes unless it says less.
inline constexpr uint32_t kDefaultMaxTransfer = 32u << 20;

struct Geometry {
  uint64_t size = 0;               // bytes
  uint32_t min_block = 1;          // every offset and length is a multiple
  uint32_t preferred_block = 4096;  // what clients should use for efficiency
  uint32_t max_transfer = kDefaultMaxTransfer;  // largest single read/write the device takes
};

// How an operation is provided: not at all, emulated by CheckedDevice, or by
// the device itself.
enum class Support : uint8_t { none, emulate, native };

struct Capabilities {
  bool read_only = false;
  Support flush = Support::none;     // durable-write barrier
  Support fua = Support::none;       // per-write durability
  Support trim = Support::none;      // discard (advisory)
  Support zero = Support::none;      // write zeroes without a data buffer
  Support extents = Support::none;   // allocation status (holes, zeroes)
  Support prefetch = Support::none;  // advisory cache fill
  // A flush on any connection covers writes completed on every connection.
  bool multi_conn = false;
};

// Per-request flags, a superset of what front ends can ask for.
using IoFlags = uint32_t;
inline constexpr IoFlags kFua = 1u << 0;       // write/trim/zero: durable before completion
inline constexpr IoFlags kNoHole = 1u << 1;    // zero: keep the range allocated
inline constexpr IoFlags kFastZero = 1u << 2;  // zero: fail with ENOTSUP rather than write slowly
// read, below the cache only (never from a client): background work, the
// prefetch, which the remote bandwidth cap serves after client requests.
inline constexpr IoFlags kBackground = 1u << 8;

// base:allocation semantics (NBD): hole = not allocated, zero = reads as zero.
inline constexpr uint32_t kExtentHole = 1u << 0;
inline constexpr uint32_t kExtentZero = 1u << 1;

struct Extent {
  uint64_t length = 0;
  uint32_t flags = 0;
  friend bool operator==(const Extent&, const Extent&) = default;
};
using ExtentList = std::vector<Extent>;

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  [[nodiscard]] virtual Geometry geometry() const noexcept = 0;
  [[nodiscard]] virtual Capabilities capabilities() const noexcept = 0;
  // A short human-readable description for logs ("file:/var/tmp/x.img").
  [[nodiscard]] virtual std::string describe() const = 0;

  virtual Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) = 0;
  virtual Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                                      IoFlags flags) = 0;
  virtual Task<std::error_code> flush() = 0;
  virtual Task<std::error_code> trim(ByteRange range, IoFlags flags) = 0;
  virtual Task<std::error_code> zero(ByteRange range, IoFlags flags) = 0;
  // Appends extents that describe consecutive bytes from range.offset; they
  // may cover less than the range but must cover at least one byte.
  virtual Task<std::error_code> block_status(ByteRange range, ExtentList& out) = 0;
  virtual Task<std::error_code> prefetch(ByteRange range) = 0;
  // Orderly end before destruction: stop background work, persist state.
  // Called once, after the last request has completed.
  virtual Task<void> close() { co_return; }
};

// A Layer wraps the device below it and forwards every call it does not
// override. It owns what is below.
class Layer : public BlockDevice {
 public:
  explicit Layer(std::unique_ptr<BlockDevice> next) : next_(std::move(next)) {}

  [[nodiscard]] Geometry geometry() const noexcept override { return next_->geometry(); }
  [[nodiscard]] Capabilities capabilities() const noexcept override {
    return next_->capabilities();
  }
  [[nodiscard]] std::string describe() const override { return next_->describe(); }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override {
    return next_->read(buf, offset, flags);
  }
  Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                              IoFlags flags) override {
    return next_->write(buf, offset, flags);
  }
  Task<std::error_code> flush() override { return next_->flush(); }
  Task<std::error_code> trim(ByteRange range, IoFlags flags) override {
    return next_->trim(range, flags);
  }
  Task<std::error_code> zero(ByteRange range, IoFlags flags) override {
    return next_->zero(range, flags);
  }
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override {
    return next_->block_status(range, out);
  }
  Task<std::error_code> prefetch(ByteRange range) override { return next_->prefetch(range); }
  Task<void> close() override { return next_->close(); }

 protected:
  [[nodiscard]] BlockDevice& next() const noexcept { return *next_; }

 private:
  std::unique_ptr<BlockDevice> next_;
};

// errno -> std::error_code, the one spelling used on the data path.
[[nodiscard]] inline std::error_code errno_code(int e) noexcept {
  return {e, std::system_category()};
}

}  // namespace blockway::core
