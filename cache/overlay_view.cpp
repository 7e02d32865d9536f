// OverlayLayer::View: a snapshot of a clone as a read-only device, served by
// the daemon as the export CLONE@SNAPSHOT.
//
// It reads what the clone read when the snapshot was taken: the chain's
// levels up to and including the snapshot's, then the base. It holds the
// snapshot's level object and looks it up in the current chain on every
// request, so chain changes pass under it: a new snapshot or a revert only
// changes levels above it, and deleting an older snapshot merges that one
// into the level above, which keeps the content of every level from there
// up. Once its own snapshot is deleted (the daemon refuses that while
// clients use the view, unless forced) its requests fail with EIO.
//
// Thread model: any event-loop thread, like the layer; the view keeps no
// state of its own beyond the level it anchors on.
#include "cache/overlay_layer.hpp"

namespace blockway::cache {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;

class OverlayLayer::View final : public core::BlockDevice {
 public:
  View(OverlayLayer& o, std::shared_ptr<Level> anchor, std::string name, std::shared_ptr<const void> keep)
      : o_(o), anchor_(std::move(anchor)), name_(std::move(name)), keep_(std::move(keep)) {}

  [[nodiscard]] core::Geometry geometry() const noexcept override { return o_.geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override {
    core::Capabilities c;
    c.read_only = true;
    c.flush = c.extents = c.prefetch = Support::native;
    c.multi_conn = true;
    return c;
  }
  [[nodiscard]] std::string describe() const override {
    return "snapshot '" + name_ + "' of clone '" + o_.name_ + "' (read-only)";
  }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override {
    const auto c = o_.chain();
    const size_t upto = level_in(*c);
    if (upto == 0) co_return gone();
    co_return co_await o_.read_levels(*c, upto, buf, offset, flags, false);
  }
  Task<std::error_code> write(std::span<const std::byte>, uint64_t, IoFlags) override { co_return errno_code(EROFS); }
  Task<std::error_code> trim(ByteRange, IoFlags) override { co_return errno_code(EROFS); }
  Task<std::error_code> zero(ByteRange, IoFlags) override { co_return errno_code(EROFS); }
  // Nothing to make durable: a snapshot is committed when it is taken.
  Task<std::error_code> flush() override { co_return std::error_code{}; }

  Task<std::error_code> block_status(ByteRange range, core::ExtentList& out) override {
    const auto c = o_.chain();
    const size_t upto = level_in(*c);
    if (upto == 0) co_return gone();
    co_return co_await o_.block_status_levels(*c, upto, range, out);
  }
  Task<std::error_code> prefetch(ByteRange range) override { co_return co_await o_.prefetch(range); }
  // The overlay is the clone's to close.
  Task<void> close() override { co_return; }

 private:
  // How many levels the view reads (its own index + 1), or 0 once its
  // snapshot left the chain. The top is never a snapshot.
  size_t level_in(const Chain& c) const noexcept {
    for (size_t i = 0; i + 1 < c.levels.size(); ++i)
      if (c.levels[i] == anchor_) return i + 1;
    return 0;
  }
  std::error_code gone() const {
    o_.log_->warn("export '{}@{}': the snapshot was deleted; its view fails", o_.name_, name_);
    return errno_code(EIO);
  }

  OverlayLayer& o_;
  std::shared_ptr<Level> anchor_;
  std::string name_;
  std::shared_ptr<const void> keep_;
};

std::unique_ptr<core::BlockDevice> OverlayLayer::snapshot_view(const std::string& name,
                                                               std::shared_ptr<const void> keep) {
  const auto c = chain();
  const size_t k = find_snapshot(*c, name);
  if (k == c->names.size()) return nullptr;
  return std::make_unique<View>(*this, c->levels[k], name, std::move(keep));
}

}  // namespace blockway::cache
