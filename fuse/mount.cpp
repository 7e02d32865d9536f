#include "fuse/mount.hpp"

#include "core/logging.hpp"
#include "fuse/libfuse.hpp"
#include "fuse/mount_point.hpp"
#include "fuse/operations.hpp"
#include "fuse/reader.hpp"

#include <boost/asio/post.hpp>

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <utility>

namespace blockway::fuse {

namespace {

// libfuse's own messages (mount errors, protocol warnings) into our log.
void log_from_libfuse(enum fuse_log_level level, const char* fmt, va_list ap) {
  char text[1024];
  std::vsnprintf(text, sizeof text, fmt, ap);
  std::string_view msg(text);
  while (!msg.empty() && msg.back() == '\n') msg.remove_suffix(1);
  try {  // called from C: nothing may escape
    static const auto log = core::logger("fuse");
    if (level <= FUSE_LOG_ERR)
      log->error("libfuse: {}", msg);
    else if (level <= FUSE_LOG_NOTICE)
      log->warn("libfuse: {}", msg);
    else
      log->debug("libfuse: {}", msg);
  } catch (...) {
  }
}

}  // namespace

Mount::Mount(core::EventLoops& loops, core::ExportTable& exports, FuseOptions options)
    : loops_(loops), exports_(exports), options_(std::move(options)), log_(core::logger("fuse")), inodes_(log_) {}

Mount::~Mount() = default;

// Probes DIR, detaches a stale mount there, creates the directory if
// missing, and mounts a new session on it. Throws std::runtime_error. Called
// without the mutex: every step here may wait for whatever is mounted at DIR.
Mount::NewSession Mount::mount_session(const std::string& where) {
  const std::string path = prepare_mount_point(where, options_.mount_timeout, *log_);
  std::string mount_opts = "fsname=blockway,subtype=blockway,default_permissions,max_read=" + std::to_string(kMaxIo);
  if (options_.allow_other) mount_opts += ",allow_other";
  std::vector<std::string> argv_s = {"blockwayd", "-o", mount_opts};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  fuse_set_log_func(log_from_libfuse);
  const auto& ops = operations();
  const int dead = make_dead_end();
  if (dead < 0) throw std::runtime_error(std::string("FUSE: cannot make a pipe: ") + std::strerror(errno));
  fuse_session* session = fuse_session_new(&args, &ops, sizeof(ops), this);
  fuse_opt_free_args(&args);
  if (!session) {
    ::close(dead);
    throw std::runtime_error("FUSE: cannot create a session (see the log)");
  }
  if (fuse_session_mount(session, path.c_str()) != 0) {
    fuse_session_destroy(session);
    ::close(dead);
    throw std::runtime_error("FUSE: cannot mount " + path + " (see the log)");
  }
  return {session, path, dead};
}

// Every reader's epoll wakes for every request (no EPOLLEXCLUSIVE in Asio),
// so readers beyond one cost a wasted wakeup per request; see
// docs/architecture.md. Loops 1.. serve large transfers either way.
void Mount::start_readers(int fd) {
  readers_.clear();
  const size_t nreaders = std::clamp<size_t>(options_.readers, 1, loops_.size());
  for (size_t i = 0; i < nreaders; ++i) {
    const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (copy < 0) break;
    readers_.push_back(std::make_shared<Reader>(loops_.at(i), copy, se_, log_, [this] { reader_ended(); }));
  }
  readers_running_ = readers_.size();
}

void Mount::mount(const std::string& where) {
  {
    std::lock_guard lock(mutex_);
    if (state_ == State::mounting) throw std::runtime_error("FUSE: a mount is already being made");
    if (state_ != State::idle) throw std::runtime_error("FUSE: already mounted at " + dir_);
    state_ = State::mounting;
  }
  NewSession fresh;
  try {
    fresh = mount_session(where);
    const std::string& path = fresh.dir;
    std::lock_guard lock(mutex_);
    dir_ = path;
    mount_ns_.store(now_ns(), std::memory_order_relaxed);
    inodes_.reset(exports_.list());
    se_ = fresh.session;
    start_readers(fuse_session_fd(fresh.session));
    dead_end_ = fresh.dead_end;
    state_ = State::mounted;
    // From here on the session is live: the readers start, and a failure to
    // log is no reason to take the mount down.
    for (auto& r : readers_) boost::asio::post(r->executor(), [r] { r->start(); });
    try {
      log_->info("FUSE: {} export(s) as files in {} ({} reader loops{}{})", inodes_.totals().files, path,
                 readers_.size(), options_.direct_io ? ", direct I/O" : "", options_.allow_other ? ", allow_other" : "");
    } catch (...) {
    }
  } catch (...) {
    std::function<void()> done;
    {
      std::lock_guard lock(mutex_);
      readers_.clear();  // not started, unless posting a later one failed for want of memory (not handled)
      readers_running_ = 0;
      se_ = nullptr;
      dead_end_ = -1;
      state_ = State::idle;
      done = on_unmounted_;
    }
    if (fresh.session) {
      (void)::umount2(fresh.dir.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);
      end_session(fresh.session, fresh.dead_end);
    }
    // Whoever waits for the front end to become idle (a daemon shutting
    // down while this mount was being made) must hear of it.
    if (done) done();
    throw;
  }
}

void Mount::unmount() {
  std::lock_guard lock(mutex_);
  if (state_ != State::mounted) return;
  state_ = State::unmounting;
  log_->info("FUSE: unmounting {}", dir_);
  boost::asio::post(loops_.blocking(), [self = shared_from_this(), path = dir_] {
    // A plain umount succeeds when no file is open; the kernel then ends the
    // session and every reader sees ENODEV.
    if (::umount2(path.c_str(), 0) == 0) return;
    const int e = errno;
    if (e == EBUSY) {
      // Open files (a loop device, a VM): take the mount out of the namespace
      // now, keep serving them for a while, then cut them off.
      self->log_->warn("FUSE: {} is busy; detached, its open files are served for up to {} s", path,
                       self->options_.shutdown_timeout.count() / 1000);
      (void)detach_mount(path);
    } else if (e != EINVAL && e != ENOENT) {
      self->log_->warn("FUSE: umount {}: {}", path, std::strerror(e));
      (void)detach_mount(path);
    }
    std::lock_guard lock(self->mutex_);
    if (self->state_ != State::unmounting) return;
    self->detach_timer_ =
        std::make_unique<boost::asio::steady_timer>(self->loops_.at(0), self->options_.shutdown_timeout);
    self->detach_timer_->async_wait([self](const boost::system::error_code& ec) {
      if (ec) return;
      std::lock_guard lock(self->mutex_);
      if (self->state_ != State::unmounting) return;
      self->log_->warn("FUSE: files on {} still open after the shutdown timeout; ending the session", self->dir_);
      for (auto& r : self->readers_) r->stop();
    });
  });
}

void Mount::reader_ended() {
  {
    std::lock_guard lock(mutex_);
    if (readers_running_ > 0) --readers_running_;
    if (state_ == State::mounted) {
      // Unmounted from outside (fusermount -u, umount): end the session too.
      log_->warn("FUSE: {} was unmounted from outside", dir_);
      state_ = State::unmounting;
    }
    if (state_ == State::unmounting)
      for (auto& r : readers_) r->stop();  // the others end too (ENODEV, or now)
  }
  check_finished();
}

void Mount::check_finished() {
  std::function<void()> done;
  {
    std::lock_guard lock(mutex_);
    if (state_ != State::unmounting || readers_running_ != 0 || inflight_.load(std::memory_order_acquire) != 0 ||
        !se_)
      return;
    // No reader and no request left: nothing can write to se_'s fd any more.
    fuse_session* old = se_;
    se_ = nullptr;
    if (detach_timer_) {
      boost::asio::post(loops_.at(0), [t = std::shared_ptr<boost::asio::steady_timer>(std::move(detach_timer_))] {
        t->cancel();
      });
    }
    readers_.clear();
    state_ = State::idle;
    // The mount is already gone (or detached): close the last descriptor,
    // without a second umount by path.
    end_session(old, std::exchange(dead_end_, -1));
    inodes_.release_all();  // files still open when the session was cut off
    log_->info("FUSE: {} unmounted", dir_);
    done = on_unmounted_;
  }
  if (done) done();
}

void Mount::on_export(const std::shared_ptr<core::Export>& exp, core::ExportEvent event) {
  if (!inodes_.apply(exp, event)) return;
  std::lock_guard lock(mutex_);
  if (state_ != State::mounted || !se_) return;
  // The kernel caches names and the directory listing; tell it. These calls
  // may wait for the kernel, which may be waiting for one of our replies:
  // never on a loop thread.
  begin_request();
  boost::asio::post(loops_.blocking(), [self = shared_from_this(), name = exp->name] {
    fuse_lowlevel_notify_inval_entry(self->se_, FUSE_ROOT_ID, name.c_str(), name.size());
    fuse_lowlevel_notify_inval_inode(self->se_, FUSE_ROOT_ID, 0, 0);
    self->end_request();
  });
}

void Mount::forget(const std::shared_ptr<core::Export>& exp) {
  const auto node = inodes_.lookup(exp->name);
  if (!node || node->exp != exp) return;
  fuse_session* se = nullptr;
  {
    std::lock_guard lock(mutex_);
    if (state_ != State::mounted || !se_) return;
    se = se_;
    begin_request();  // keeps the session until the notifications are done
  }
  // The name: a file now hidden from some users must be looked up again.
  // The attributes only (a negative offset), not the page cache: the data
  // did not change. ENOENT when the kernel holds none of it: fine.
  (void)fuse_lowlevel_notify_inval_entry(se, FUSE_ROOT_ID, exp->name.c_str(), exp->name.size());
  (void)fuse_lowlevel_notify_inval_inode(se, node->ino, -1, 0);
  end_request();
}

void Mount::tear_down() {
  std::lock_guard lock(mutex_);
  if (!se_) return;
  // Once unmounting, the directory is no longer ours: something else may be
  // mounted there by now.
  if (state_ == State::mounted) (void)::umount2(dir_.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);
  readers_.clear();
  end_session(se_, std::exchange(dead_end_, -1));
  se_ = nullptr;
  inodes_.release_all();
}

void Mount::set_on_unmounted(std::function<void()> fn) {
  std::lock_guard lock(mutex_);
  on_unmounted_ = std::move(fn);
}

bool Mount::active() const {
  std::lock_guard lock(mutex_);
  return state_ != State::idle;
}

std::string Mount::mountpoint() const {
  std::lock_guard lock(mutex_);
  const bool has_dir = state_ == State::mounted || state_ == State::unmounting;
  return has_dir ? dir_ : std::string();
}

}  // namespace blockway::fuse
