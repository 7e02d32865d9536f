#include "fuse/fuse_front_end.hpp"

#include "fuse/mount.hpp"

#include <utility>

namespace blockway::fuse {

FuseFrontEnd::FuseFrontEnd(core::EventLoops& loops, core::ExportTable& exports, FuseOptions options)
    : exports_(exports), mount_(std::make_shared<Mount>(loops, exports, std::move(options))) {
  std::weak_ptr<Mount> weak = mount_;
  observer_id_ = exports.subscribe([weak](const std::shared_ptr<core::Export>& exp, core::ExportEvent ev) {
    if (auto mount = weak.lock()) mount->on_export(exp, ev);
  });
}

FuseFrontEnd::~FuseFrontEnd() {
  exports_.unsubscribe(observer_id_);
  mount_->tear_down();
}

void FuseFrontEnd::mount(const std::string& dir) { mount_->mount(dir); }
void FuseFrontEnd::unmount() { mount_->unmount(); }
void FuseFrontEnd::set_on_unmounted(std::function<void()> fn) { mount_->set_on_unmounted(std::move(fn)); }
bool FuseFrontEnd::active() const { return mount_->active(); }
std::string FuseFrontEnd::mountpoint() const { return mount_->mountpoint(); }
void FuseFrontEnd::forget(const std::shared_ptr<core::Export>& exp) { mount_->forget(exp); }

}  // namespace blockway::fuse
