// The stand-in remote of a detached export: the cache file is the image.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/logging.hpp"

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <stdexcept>

namespace blockway::cache {

// ---- the stand-in remote of a detached export ------------------------------------------------

namespace {

class DetachedRemote final : public core::BlockDevice {
 public:
  DetachedRemote(uint64_t size, std::string uri) : size_(size), uri_(std::move(uri)) {}
  [[nodiscard]] core::Geometry geometry() const noexcept override { return {size_, 1, 4096, 32u << 20}; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return {}; }
  [[nodiscard]] std::string describe() const override { return uri_ + " (detached, not opened)"; }
  Task<std::error_code> read(std::span<std::byte>, uint64_t, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> write(std::span<const std::byte>, uint64_t, IoFlags) override {
    co_return errno_code(ENOTCONN);
  }
  Task<std::error_code> flush() override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> trim(ByteRange, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> zero(ByteRange, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> block_status(ByteRange, core::ExtentList&) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> prefetch(ByteRange) override { co_return errno_code(ENOTCONN); }

 private:
  uint64_t size_;
  std::string uri_;
};

}  // namespace

std::unique_ptr<core::BlockDevice> open_if_detached(MetaStore& store, const std::string& export_name,
                                                       const std::string& remote_uri) {
  auto rec = store.find(export_name);
  if (!rec || store.get_state(export_name, "detached").value_or("") != "1") return nullptr;
  if (rec->remote != remote_uri)
    throw std::runtime_error("export '" + export_name + "' is detached (local mode) from " + rec->remote +
                             " and its image is " + rec->cache_path + "; it is now configured with " + remote_uri +
                             ": restore the old URI, or serve the image itself with file://" + rec->cache_path);
  std::error_code ec;
  const auto size = std::filesystem::file_size(rec->cache_path, ec);
  if (ec || size != rec->size)
    throw std::runtime_error("export '" + export_name + "' is detached (local mode), but its image " +
                             rec->cache_path + " is missing or not " + std::to_string(rec->size) +
                             " bytes; restore it (the remote " + remote_uri + " may be out of date)");
  return std::make_unique<DetachedRemote>(rec->size, remote_uri);
}

}  // namespace blockway::cache
