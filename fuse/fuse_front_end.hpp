// FuseFrontEnd: every export as a regular file in a FUSE mount directory.
//
// Thread model: no FUSE thread of its own. The /dev/fuse descriptor is
// dup()ed for each reader loop (option readers, default 1) and each keeps one
// Asio read pending on its copy; the loop that reads a request parses it with
// fuse_session_process_buf() and the low-level handler starts a coroutine on
// that loop (reads and writes of 128 KiB or more: on the next loop,
// round-robin), which calls the export's CheckedDevice (the stack NBD uses)
// and replies from its completion (fuse_reply_* writes one message to
// /dev/fuse and is safe from any thread). Nothing blocks a loop: reads of
// /dev/fuse are non-blocking, and umount and the kernel notifications (which
// may wait for a reply of ours) run on the blocking pool.
//
// Shared state: the inode table (name <-> inode <-> export) is guarded by a
// mutex and changes when exports are added or removed (ExportTable observer);
// open files hold their node by shared_ptr, so a removed export stays usable
// through descriptors opened before. mount()/unmount() may be called from any
// thread; the mount state is guarded by the same mutex, which is never held
// while mount() probes the directory or calls mount(2).
//
// Devices with min_block > 1 (an NBD remote with a 4096 minimum, iSCSI):
// reads and writes off that grid are served by reading the covering blocks;
// the partial blocks of a write (or of a fallocate range) are
// read-modify-written under a per-file AsyncMutex, so unaligned writes into
// one block take turns. Aligned requests take no lock and no copy while no
// read-modify-write is pending in their file; while one is, aligned writes
// queue behind it, and a read-modify-write first waits for the aligned
// writes in flight (two atomic counters per file, see AlignedWrite). The
// final block of an image whose size is off the grid is partial: requests
// for it end at the image's end.
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/options.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <sys/types.h>
#include <system_error>

struct fuse_session;

namespace blockway::fuse {

struct FuseOptions {
  mode_t mode = 0644;       // permission bits of writable exports' files (read-only: & 0444)
  uid_t uid = 0;            // owner of the files (default: the daemon's user)
  gid_t gid = 0;
  bool allow_other = false;  // let other users than the daemon's reach the mount
  bool direct_io = false;    // FOPEN_DIRECT_IO: bypass the kernel page cache
  unsigned readers = 1;      // event loops that read /dev/fuse (at most one per loop)
  std::chrono::milliseconds shutdown_timeout{30000};  // how long open files keep a detached mount served
  // How long mount() waits for the directory to answer (a hung FUSE mount
  // there never does): then it fails instead of waiting on.
  std::chrono::milliseconds mount_timeout{10000};

  // From [fuse] keys or --fuse-mount options. Throws core::ConfigError.
  static FuseOptions parse(const std::map<std::string, std::string>& options);
  // Every FUSE option, for --help.
  static std::span<const core::OptionSpec> options();
};

// errno for a FUSE reply from a device error: the values a file's user can act
// on pass through; anything else (timeouts, lost connections) is EIO.
int fuse_errno(std::error_code ec) noexcept;

// Export names that can be a file name in the mount (no '/', not . or ..,
// at most 255 bytes).
bool representable_name(const std::string& name) noexcept;

// Test hook: the next `count` allocations of a reader's receive buffer throw
// std::bad_alloc (as a real shortage would).
void fail_receive_buffers_for_test(int count) noexcept;

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

  struct Node;
  struct Handle;
  class Reader;
  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace blockway::fuse
