// MemoryDevice: an in-memory BlockDevice fake for unit tests.
//
// Capabilities and geometry are whatever the test asks for; every call is
// counted and logged; an error can be injected per operation; a "gate" makes
// calls of one operation wait until the test opens it again (to keep requests
// in flight). Native zero and trim clear the bytes, so their effect is
// visible; native block_status returns a scripted extent list.
//
// Thread model: the device is called on some io_context thread while the
// test thread inspects it, so all state is guarded by a mutex or atomic.
#pragma once

#include "core/block_device.hpp"
#include "tests/support/test_util.hpp"

#include <boost/asio/steady_timer.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace blockway::test {

enum class Op : uint8_t { read, write, flush, trim, zero, block_status, prefetch };
inline constexpr size_t kOpCount = 7;

// Every capability native (flush, fua, trim, zero, extents, prefetch), with
// multi_conn: a device that offers all it can.
inline core::Capabilities native_caps() {
  core::Capabilities c;
  c.flush = c.fua = c.trim = c.zero = c.extents = c.prefetch = core::Support::native;
  c.multi_conn = true;
  return c;
}

struct Call {
  Op op = Op::read;
  uint64_t offset = 0;
  uint64_t length = 0;
  core::IoFlags flags = 0;
  friend bool operator==(const Call&, const Call&) = default;
};

class MemoryDevice final : public core::BlockDevice {
 public:
  // geometry.size bytes of zeroes.
  MemoryDevice(core::Geometry geometry, core::Capabilities caps);
  ~MemoryDevice() override;

  [[nodiscard]] core::Geometry geometry() const noexcept override {
    std::lock_guard lock(mutex_);
    return geometry_;
  }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override { return "memory"; }

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset,
                                      core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                                       core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range,
                                              core::ExtentList& out) override;
  core::Task<std::error_code> prefetch(core::ByteRange range) override;

  // --- test controls (any thread) ---
  // Every later call of `op` fails with errno `err` (0: succeed again).
  void fail(Op op, int err);
  // Every later read, write, zero, trim or block_status whose offset or
  // length is off the min_block grid fails with EINVAL (as nbdkit's
  // blocksize-policy filter does): the partial final block of an image
  // whose size is off the grid cannot be reached.
  void refuse_partial_blocks(bool on);
  // The image grows to `size` bytes (never shrinks), the new ones zero: an
  // rbd resize or truncate -s under a served export.
  void grow(uint64_t size);
  // Native block_status appends exactly these extents (default: one data extent).
  void set_extents(core::ExtentList extents);
  // Closes or opens the gate of `op`: while closed, calls wait before doing anything.
  void close_gate(Op op);
  void open_gate(Op op);

  [[nodiscard]] uint64_t calls(Op op) const { return counts_[static_cast<size_t>(op)].load(); }
  // Calls of `op` that have started but not finished.
  [[nodiscard]] uint64_t in_flight(Op op) const { return active_[static_cast<size_t>(op)].load(); }
  [[nodiscard]] uint64_t max_in_flight(Op op) const { return max_active_[static_cast<size_t>(op)].load(); }
  [[nodiscard]] std::vector<Call> log() const;
  [[nodiscard]] std::vector<Call> log_of(Op op) const;
  void clear_log();

  [[nodiscard]] std::vector<std::byte> contents(uint64_t offset, uint64_t length) const;
  void fill(uint64_t offset, uint64_t length, std::byte value);
  // Fills with a position-dependent pattern that never contains a zero byte.
  void fill_pattern(uint64_t offset, uint64_t length);
  static std::byte pattern_at(uint64_t pos) { return std::byte(static_cast<uint8_t>(pos % 251 + 1)); }

 private:
  struct Waiter;
  // Records the call, then waits while the gate of op is closed; returns the injected error.
  core::Task<std::error_code> enter(Call call);
  void leave(Op op);
  // trim and zero (op): both clear the bytes of the range.
  core::Task<std::error_code> clear(Op op, core::ByteRange range, core::IoFlags flags);

  core::Geometry geometry_;
  core::Capabilities caps_;
  mutable std::mutex mutex_;
  std::vector<std::byte> data_;
  std::vector<Call> log_;
  std::array<int, kOpCount> errors_{};
  std::array<bool, kOpCount> gate_closed_{};
  bool refuse_partial_ = false;
  std::vector<std::shared_ptr<Waiter>> waiters_;
  std::optional<core::ExtentList> extents_;
  std::array<std::atomic<uint64_t>, kOpCount> counts_{};
  std::array<std::atomic<uint64_t>, kOpCount> active_{};
  std::array<std::atomic<uint64_t>, kOpCount> max_active_{};
};

}  // namespace blockway::test
