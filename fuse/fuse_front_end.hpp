// FuseFrontEnd: every export as a regular file in a FUSE mount directory.
//
// The parts, each in its own file: FuseOptions (fuse_options), the mount's
// life (mount: idle, mounting, mounted, unmounting) and its directory
// (mount_point), the /dev/fuse reading loops (reader), the files and open
// handles (inode_table), the operations (operations) and how a request is
// served (request). Devices with min_block > 1 get a core::BlockSizeLayer
// per file, which takes requests of any size and alignment.
//
// Thread model: no FUSE thread of its own. The /dev/fuse descriptor is
// dup()ed for each reader loop (option readers, default 1) and each keeps one
// Asio read pending on its copy; the loop that reads a request parses it and
// the operation starts a coroutine on that loop (reads and writes of 128 KiB
// or more: on the next loop, round-robin), which calls the export's device
// and replies from its completion. Nothing blocks a loop: reads of /dev/fuse
// are non-blocking, and umount and the kernel notifications (which may wait
// for a reply of ours) run on the blocking pool (forget(): its caller
// offloads it there). This class itself only forwards to the Mount and
// follows the export table (an ExportTable observer, on the thread that
// changed it).
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "fuse/fuse_options.hpp"

#include <functional>
#include <memory>
#include <string>

namespace blockway::fuse {

class Mount;

class FuseFrontEnd {
 public:
  FuseFrontEnd(core::EventLoops& loops, core::ExportTable& exports, FuseOptions options);
  ~FuseFrontEnd();
  FuseFrontEnd(const FuseFrontEnd&) = delete;
  FuseFrontEnd& operator=(const FuseFrontEnd&) = delete;

  // Mounts at dir (created if missing). A stale mount left by a crashed
  // daemon (ENOTCONN) is detached first; a live mount is refused. Throws
  // std::runtime_error with a message naming dir. Probing dir and mount(2)
  // run without the front end's mutex (a hung mount at dir may take long):
  // meanwhile active() is true, unmount() does nothing and a second mount()
  // is refused at once. The probes run on a thread of their own, bounded by
  // options.mount_timeout: a directory that does not answer by then fails
  // the mount (the probe is left waiting, detached, and acts on nothing).
  void mount(const std::string& dir);
  // Starts an orderly unmount: detach the mount, serve files still open for
  // up to shutdown_timeout, wait for every request in flight. Returns at
  // once; on_unmounted runs when it is done. Idempotent.
  void unmount();
  // Runs (on some loop or pool thread) every time a mount ends, whether by
  // unmount() or because someone unmounted it from outside, and when a
  // mount() that got past its first checks fails (the front end is idle
  // again: whoever waits for that, a daemon shutting down, hears of it).
  void set_on_unmounted(std::function<void()> fn);
  // Being mounted, mounted, or unmounting and not finished yet.
  [[nodiscard]] bool active() const;
  [[nodiscard]] std::string mountpoint() const;
  // The export's owner, mode or allow= rules changed at run time: makes the
  // kernel forget its file's cached name and attributes (it checks
  // permissions against them), so that the next stat or open asks again.
  // Returns when the kernel has done so; nothing when not mounted. May wait
  // for the kernel, which may wait for a reply of ours: call it on the
  // blocking pool, never on a loop.
  void forget(const std::shared_ptr<core::Export>& exp);

 private:
  core::ExportTable& exports_;
  std::shared_ptr<Mount> mount_;
  uint64_t observer_id_ = 0;
};

}  // namespace blockway::fuse
