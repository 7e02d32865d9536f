// VolatileDevice: an in-memory image with a disk's volatile write cache: it
// keeps a durable image and a current one; write/zero change the current one
// (and log the change as pending); flush() makes the current one durable; a
// FUA write is durable at once. crash() models power loss: the current image
// goes back to the durable one, and optionally a random subset of the pending
// changes (whole, torn at sector granularity, or not at all) is applied.
//
// Thread model: called from a test's loop threads while the test thread
// inspects it: all its state is under a mutex.
#pragma once

#include "core/block_device.hpp"

#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace blockway::test {

class VolatileDevice final : public core::BlockDevice {
 public:
  static constexpr uint64_t kSector = 512;

  explicit VolatileDevice(uint64_t size) : durable_(size), current_(size) {}

  [[nodiscard]] core::Geometry geometry() const noexcept override {
    return {durable_.size(), 1, 4096, 32u << 20};
  }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override {
    core::Capabilities c;
    c.flush = c.fua = c.zero = c.trim = core::Support::native;
    c.multi_conn = true;
    return c;
  }
  [[nodiscard]] std::string describe() const override { return "volatile"; }

  core::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags) override {
    std::lock_guard l(mu_);
    if (fail_.load()) co_return core::errno_code(EIO);
    if (o + b.size() > current_.size()) co_return core::errno_code(EIO);
    std::memcpy(b.data(), current_.data() + o, b.size());
    ++reads_;
    co_return std::error_code{};
  }
  core::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, core::IoFlags f) override {
    co_return apply_op(o, std::vector<std::byte>(b.begin(), b.end()), f);
  }
  core::Task<std::error_code> zero(core::ByteRange r, core::IoFlags f) override {
    co_return apply_op(r.offset, std::vector<std::byte>(r.length), f);
  }
  core::Task<std::error_code> trim(core::ByteRange r, core::IoFlags f) override {
    co_return apply_op(r.offset, std::vector<std::byte>(r.length), f);
  }
  core::Task<std::error_code> flush() override {
    std::lock_guard l(mu_);
    if (fail_.load()) co_return core::errno_code(EIO);
    durable_ = current_;
    pending_.clear();
    ++flushes_;
    co_return std::error_code{};
  }
  core::Task<std::error_code> block_status(core::ByteRange r, core::ExtentList& out) override {
    out.push_back({r.length, 0});
    co_return std::error_code{};
  }
  core::Task<std::error_code> prefetch(core::ByteRange) override { co_return std::error_code{}; }

  // --- test controls ---
  void set_failing(bool on) { fail_.store(on); }
  // Power loss. With partial=false every pending change is lost; with
  // partial=true each pending change is kept, lost, or torn at random.
  void crash(std::mt19937_64& rng, bool partial) {
    std::lock_guard l(mu_);
    current_ = durable_;
    if (partial) {
      for (const auto& p : pending_) {
        const int how = static_cast<int>(rng() % 3);
        if (how == 0) continue;
        for (uint64_t s = 0; s < p.data.size(); s += kSector) {
          if (how == 2 && rng() % 2) continue;
          const uint64_t n = std::min<uint64_t>(kSector, p.data.size() - s);
          std::memcpy(current_.data() + p.offset + s, p.data.data() + s, n);
        }
      }
    }
    durable_ = current_;
    pending_.clear();
  }
  void fill_both(const std::vector<std::byte>& image) {
    std::lock_guard l(mu_);
    durable_ = current_ = image;
    pending_.clear();
  }
  std::vector<std::byte> durable(uint64_t o, uint64_t n) const {
    std::lock_guard l(mu_);
    return {durable_.begin() + static_cast<long>(o), durable_.begin() + static_cast<long>(o + n)};
  }
  std::vector<std::byte> current(uint64_t o, uint64_t n) const {
    std::lock_guard l(mu_);
    return {current_.begin() + static_cast<long>(o), current_.begin() + static_cast<long>(o + n)};
  }
  uint64_t flushes() const {
    std::lock_guard l(mu_);
    return flushes_;
  }
  uint64_t reads() const {
    std::lock_guard l(mu_);
    return reads_;
  }
  size_t pending() const {
    std::lock_guard l(mu_);
    return pending_.size();
  }

 private:
  struct Pending {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  std::error_code apply_op(uint64_t o, std::vector<std::byte> data, core::IoFlags f) {
    std::lock_guard l(mu_);
    if (fail_.load()) return core::errno_code(EIO);
    if (o + data.size() > current_.size()) return core::errno_code(EIO);
    std::memcpy(current_.data() + o, data.data(), data.size());
    if (f & core::kFua)
      std::memcpy(durable_.data() + o, data.data(), data.size());
    else
      pending_.push_back({o, std::move(data)});
    return {};
  }

  mutable std::mutex mu_;
  std::vector<std::byte> durable_, current_;
  std::vector<Pending> pending_;
  std::atomic<bool> fail_{false};
  uint64_t flushes_ = 0, reads_ = 0;
};

}  // namespace blockway::test
