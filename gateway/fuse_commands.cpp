#include "gateway/fuse_commands.hpp"

#include <cerrno>
#include <string>

namespace blockway::gateway {

using core::offload;
using core::Task;

namespace {

// `blockway mount DIR`: mount(2), and a statfs of whatever is already at DIR
// (a stale mount can take a while to answer), run on the blocking pool, not
// on the control plane's event loop.
Task<Json> mount_command(fuse::FuseFrontEnd& fuse, boost::asio::thread_pool& pool, const std::atomic<bool>& stopping,
                         Json request) {
  const std::string dir = arg_string(request, "dir");
  if (dir.empty() || dir.front() != '/')
    throw ControlError("bad-request", EINVAL, "mount: dir must be an absolute path, not '" + dir + "'");
  if (stopping.load()) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  if (fuse.active()) throw ControlError("refused", EBUSY, "the exports are already mounted at " + fuse.mountpoint());
  auto mounting = offload(pool, [&fuse, dir]() -> std::string {
    try {
      fuse.mount(dir);
      return {};
    } catch (const std::exception& e) {
      return e.what();
    }
  });
  const std::string error = co_await std::move(mounting);
  if (!error.empty()) throw ControlError("failed", EIO, error);
  if (stopping.load()) {
    // SIGTERM came while mount(2) ran: its unmount() found nothing to do, and
    // a mount left behind would keep the daemon from ever finishing the drain.
    fuse.unmount();
    throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  }
  co_return Json{{"mountpoint", fuse.mountpoint()}};
}

Task<Json> unmount_command(fuse::FuseFrontEnd& fuse) {
  if (!fuse.active()) throw ControlError("refused", EINVAL, "the exports are not mounted");
  const std::string where = fuse.mountpoint();
  fuse.unmount();
  co_return Json{{"mountpoint", where}};
}

}  // namespace

void add_fuse_commands(ControlDispatcher& dispatcher, fuse::FuseFrontEnd& fuse, boost::asio::thread_pool& pool,
                       const std::atomic<bool>& stopping) {
  dispatcher.add("mount", "mount the FUSE front end: every export as a file in {dir}",
                 [&fuse, &pool, &stopping](const Json& req) { return mount_command(fuse, pool, stopping, req); });
  dispatcher.add("unmount", "unmount the FUSE front end", [&fuse](const Json&) { return unmount_command(fuse); });
}

}  // namespace blockway::gateway
