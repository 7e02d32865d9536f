// SharedDevice: a BlockDevice handle that forwards to a device owned
// elsewhere, so one remote (or one cache image) outlives several layers built
// on it in turn (a restart in a test).
//
// Thread model: as the device it forwards to.
#pragma once

#include "core/block_device.hpp"

#include <memory>
#include <string>

namespace blockway::test {

class SharedDevice final : public core::BlockDevice {
 public:
  explicit SharedDevice(std::shared_ptr<core::BlockDevice> d) : d_(std::move(d)) {}
  [[nodiscard]] core::Geometry geometry() const noexcept override { return d_->geometry(); }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return d_->capabilities(); }
  [[nodiscard]] std::string describe() const override { return d_->describe(); }
  core::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags f) override {
    return d_->read(b, o, f);
  }
  core::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, core::IoFlags f) override {
    return d_->write(b, o, f);
  }
  core::Task<std::error_code> flush() override { return d_->flush(); }
  core::Task<std::error_code> trim(core::ByteRange r, core::IoFlags f) override { return d_->trim(r, f); }
  core::Task<std::error_code> zero(core::ByteRange r, core::IoFlags f) override { return d_->zero(r, f); }
  core::Task<std::error_code> block_status(core::ByteRange r, core::ExtentList& out) override {
    return d_->block_status(r, out);
  }
  core::Task<std::error_code> prefetch(core::ByteRange r) override { return d_->prefetch(r); }

 private:
  std::shared_ptr<core::BlockDevice> d_;
};

}  // namespace blockway::test
