// Mount: one FUSE mount's life (idle -> mounting -> mounted -> unmounting ->
// idle) and what its operations share: the inode table, the options, the
// loops, and the count of requests in flight.
//
// Thread model: mount() and unmount() may be called from any thread; the
// state below is guarded by mutex_, which is never held while mount()
// probes the directory or calls mount(2) (a hung mount there may block for
// long: meanwhile the state is `mounting`, unmount() does nothing and a
// second mount() is refused at once). Lock order: mutex_, then the inode
// table's. The session is ended only when no reader runs and no request is
// in flight (replies go to its descriptor): whoever brings the last of them
// to zero (reader_ended(), end_request(), on any thread) ends it and runs
// on_unmounted. umount(2) and the kernel notifications (which may wait for
// one of our replies) run on the blocking pool, never on a loop.
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "fuse/fuse_options.hpp"
#include "fuse/inode_table.hpp"

#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

struct fuse_session;

namespace spdlog {
class logger;
}

namespace blockway::fuse {

class Reader;

class Mount : public std::enable_shared_from_this<Mount> {
 public:
  Mount(core::EventLoops& loops, core::ExportTable& exports, FuseOptions options);
  ~Mount();
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

  // See FuseFrontEnd.
  void mount(const std::string& where);
  void unmount();
  void set_on_unmounted(std::function<void()> fn);
  [[nodiscard]] bool active() const;
  [[nodiscard]] std::string mountpoint() const;
  // An export added or removed: the table follows, and the kernel forgets
  // what it cached of the name and the directory.
  void on_export(const std::shared_ptr<core::Export>& exp, core::ExportEvent event);
  // See FuseFrontEnd::forget. Blocks: never on a loop thread.
  void forget(const std::shared_ptr<core::Export>& exp);
  // The front end goes away with the loops already stopped (start-up failed
  // after mounting): ends the session directly.
  void tear_down();

  // For the operations.
  [[nodiscard]] InodeTable& inodes() noexcept { return inodes_; }
  [[nodiscard]] const FuseOptions& options() const noexcept { return options_; }
  [[nodiscard]] core::EventLoops& loops() noexcept { return loops_; }
  [[nodiscard]] spdlog::logger& log() const noexcept { return *log_; }
  [[nodiscard]] int64_t mounted_ns() const noexcept { return mount_ns_.load(std::memory_order_relaxed); }
  void begin_request() noexcept { inflight_.fetch_add(1, std::memory_order_relaxed); }
  void end_request() {
    if (inflight_.fetch_sub(1, std::memory_order_acq_rel) == 1) check_finished();
  }

 private:
  // mounting: mount() is probing DIR and calling mount(2) without the mutex.
  enum class State { idle, mounting, mounted, unmounting };
  struct NewSession {
    fuse_session* session = nullptr;
    std::string dir;
    int dead_end = -1;  // see end_session()
  };
  NewSession mount_session(const std::string& where);
  void start_readers(int fd);  // mutex_ held
  void reader_ended();
  void check_finished();

  core::EventLoops& loops_;
  core::ExportTable& exports_;
  const FuseOptions options_;
  std::shared_ptr<spdlog::logger> log_;
  InodeTable inodes_;

  mutable std::mutex mutex_;
  State state_ = State::idle;
  fuse_session* se_ = nullptr;
  int dead_end_ = -1;  // for end_session(se_, ...)
  std::string dir_;
  std::vector<std::shared_ptr<Reader>> readers_;
  size_t readers_running_ = 0;
  std::unique_ptr<boost::asio::steady_timer> detach_timer_;
  std::function<void()> on_unmounted_;
  std::atomic<int64_t> mount_ns_{0};

  // Requests being served by coroutines, plus kernel notifications queued.
  std::atomic<int64_t> inflight_{0};
};

}  // namespace blockway::fuse
