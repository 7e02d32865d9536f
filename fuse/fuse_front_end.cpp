#include "fuse/fuse_front_end.hpp"

#define FUSE_USE_VERSION 314
#include <fuse3/fuse_lowlevel.h>

#include "core/async_mutex.hpp"
#include "core/buffer_pool.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

extern char** environ;

namespace blockway::fuse {

using core::ByteRange;
using core::ExtentList;
using core::IoBuffer;
using core::Task;

namespace {

// Largest read or write the kernel sends in one request. libfuse 3.14 caps
// max_write at its receive buffer (256 pages); the kernel's max_pages follows.
constexpr uint32_t kMaxIo = 1u << 20;
// One request: header page + payload (the kernel wants room for max_write + 80).
constexpr size_t kReceiveBuffer = kMaxIo + 4096;
constexpr double kAttrTimeout = 1.0;
// Reads and writes at least this large are served on the next loop.
constexpr size_t kSpreadBytes = 128 * 1024;
// The kernel's request header (struct fuse_in_header); anything shorter is not a request.
constexpr size_t kRequestHeader = 40;
// A reader that cannot get a receive buffer (no memory) tries again after this.
constexpr auto kReceiveRetry = std::chrono::milliseconds(50);

// Test hook: receive-buffer allocations still to fail (fail_receive_buffers_for_test).
std::atomic<int> receive_failures_to_inject{0};

IoBuffer new_receive_buffer() {
  if (receive_failures_to_inject.load(std::memory_order_relaxed) > 0 &&
      receive_failures_to_inject.fetch_sub(1, std::memory_order_relaxed) > 0)
    throw std::bad_alloc();
  return IoBuffer(kReceiveBuffer);
}

int64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

timespec to_timespec(int64_t ns) {
  return timespec{static_cast<time_t>(ns / 1000000000LL), static_cast<long>(ns % 1000000000LL)};
}

// Is dir (canonical) the mount point of a FUSE filesystem right now?
bool is_fuse_mountpoint(const std::string& dir) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, mnt;
    fields >> id >> parent >> devno >> root >> mnt;
    // Unescape \040 and friends (three octal digits) in the mount point.
    std::string path;
    for (size_t i = 0; i < mnt.size(); ++i) {
      if (mnt[i] == '\\' && i + 3 < mnt.size()) {
        path += static_cast<char>(((mnt[i + 1] - '0') << 6) | ((mnt[i + 2] - '0') << 3) | (mnt[i + 3] - '0'));
        i += 3;
      } else {
        path += mnt[i];
      }
    }
    if (path != dir) continue;
    const auto sep = line.find(" - ");
    if (sep == std::string::npos) continue;
    if (line.compare(sep + 3, 4, "fuse") == 0) return true;
  }
  return false;
}

// Runs fn on a thread of its own and waits for it at most `timeout`;
// nullopt if it has not finished by then. fn must own everything it uses: on
// a timeout it runs on, detached (a probe of a hung FUSE mount waits until
// that mount's connection ends, or until the process exits).
template <class T>
std::optional<T> run_bounded(std::function<T()> fn, std::chrono::milliseconds timeout) {
  auto task = std::make_shared<std::packaged_task<T()>>(std::move(fn));
  auto result = task->get_future();
  std::thread([task] { (*task)(); }).detach();
  if (result.wait_for(timeout) != std::future_status::ready) return std::nullopt;
  return result.get();
}

// What mount() needs to know of the directory, from calls that wait for
// whatever is mounted there.
struct DirProbe {
  std::string path;        // absolute, symlinks resolved
  bool fuse_mount = false;  // a FUSE mount is listed at path
  int statvfs_errno = 0;    // of statvfs(path)
};

DirProbe probe_dir(const std::string& where) {
  DirProbe p;
  std::error_code fec;
  p.path = std::filesystem::absolute(where, fec).lexically_normal().string();
  if (p.path.size() > 1 && p.path.back() == '/') p.path.pop_back();
  // Resolve symlinks once, here: every check and the mount itself then name
  // the same directory (mountinfo lists canonical paths), and a stale-mount
  // detach cannot be pointed elsewhere through a link.
  if (auto canonical = std::filesystem::weakly_canonical(p.path, fec); !fec) p.path = canonical.string();
  if (p.path.size() > 1 && p.path.back() == '/') p.path.pop_back();
  p.fuse_mount = is_fuse_mountpoint(p.path);
  // A daemon that died without unmounting leaves a mount that answers
  // nothing (ENOTCONN). stat() may still succeed from cached attributes;
  // statfs() always asks the daemon.
  struct statvfs vfs{};
  p.statvfs_errno = ::statvfs(p.path.c_str(), &vfs) == 0 ? 0 : errno;
  return p;
}

// Lazily detaches the mount at dir: umount2(MNT_DETACH) as root, else
// fusermount3 -u -z.
bool detach_mount(const std::string& dir) {
  if (::umount2(dir.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0) return true;
  pid_t pid = 0;
  const char* argv[] = {"fusermount3", "-u", "-z", dir.c_str(), nullptr};
  if (::posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char* const*>(argv), environ) != 0)
    return false;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Ends a session whose mount we have already taken away (umount, or a lazy
// detach that open files outlive). fuse_session_unmount() would poll the
// /dev/fuse descriptor and, finding the connection alive (files still open
// on a detached mount), umount2(MNT_DETACH) the directory once more as root:
// whatever has been mounted there since would go. So the descriptor is
// swapped, in place, for the write end of a pipe without a reader, which
// polls POLLERR ("already unmounted" to libfuse): closing the /dev/fuse
// descriptor ends the connection (open files then get ENOTCONN), and
// libfuse's unmount closes the pipe instead. Any thread; no reader may be
// using the descriptor any more.
// dead_end is that pipe end, made when the session was mounted (so this
// cannot fail for want of a descriptor); it is closed here.
void end_session(fuse_session* session, int dead_end) {
  const int fd = fuse_session_fd(session);
  if (fd >= 0 && dead_end >= 0) (void)::dup3(dead_end, fd, O_CLOEXEC);
  if (dead_end >= 0) ::close(dead_end);
  fuse_session_unmount(session);  // polls POLLERR: closes the descriptor, unmounts nothing
  fuse_session_destroy(session);
}

// The write end of a pipe whose read end is closed: it polls POLLERR.
int make_dead_end() {
  int p[2] = {-1, -1};
  if (::pipe2(p, O_CLOEXEC) != 0) return -1;
  ::close(p[0]);
  return p[1];
}

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

const core::OptionSpec kFuseOptions[] = {
    {.name = "mode",
     .kind = core::OptionKind::octal,
     .help = "permission bits of the files (default 0644; read-only exports & 0444)",
     .min = 0,
     .max = 07777},
    {.name = "uid",
     .kind = core::OptionKind::number,
     .help = "owner of the files (default: the daemon's user)",
     .min = 0,
     .max = UINT32_MAX - 1},
    {.name = "gid",
     .kind = core::OptionKind::number,
     .help = "group of the files (default: the daemon's group)",
     .min = 0,
     .max = UINT32_MAX - 1},
    {.name = "allow-other",
     .kind = core::OptionKind::flag,
     .help = "let users other than the daemon's reach the mount (default off)",
     .aliases = {"allow_other"}},
    {.name = "direct-io",
     .kind = core::OptionKind::flag,
     .help = "bypass the kernel page cache (default off)",
     .aliases = {"direct_io"}},
    {.name = "readers",
     .kind = core::OptionKind::number,
     .help = "event loops that read /dev/fuse (default 1)",
     .min = 1,
     .max = 256},
    {.name = "mount-timeout",
     .kind = core::OptionKind::seconds,
     .help = "how long a mount waits for the directory to answer (default 10)",
     .min = 1,
     .max = 86400,
     .aliases = {"mount_timeout"}},
};

std::span<const core::OptionSpec> FuseOptions::options() { return kFuseOptions; }

FuseOptions FuseOptions::parse(const std::map<std::string, std::string>& given) {
  enum { kMode, kUid, kGid, kAllowOther, kDirectIo, kReaders, kMountTimeout };
  std::map<std::string, std::string> values = given;
  core::Options options(values, "", "fuse option");
  FuseOptions o;
  o.uid = ::geteuid();
  o.gid = ::getegid();
  if (auto v = options.number(kFuseOptions[kMode])) o.mode = static_cast<mode_t>(*v);
  if (auto v = options.number(kFuseOptions[kUid])) o.uid = static_cast<uid_t>(*v);
  if (auto v = options.number(kFuseOptions[kGid])) o.gid = static_cast<gid_t>(*v);
  if (auto v = options.flag(kFuseOptions[kAllowOther])) o.allow_other = *v;
  if (auto v = options.flag(kFuseOptions[kDirectIo])) o.direct_io = *v;
  if (auto v = options.number(kFuseOptions[kReaders])) o.readers = static_cast<unsigned>(*v);
  if (auto v = options.seconds(kFuseOptions[kMountTimeout])) o.mount_timeout = *v;
  options.finish();
  return o;
}

int fuse_errno(std::error_code ec) noexcept {
  if (!ec) return 0;
  switch (ec.value()) {
    case EIO:
    case ENOSPC:
    case EROFS:
    case EINVAL:
    case EFBIG:
    case ENOMEM:
    case EOPNOTSUPP:
    case EDQUOT:
    case EPERM:
    case EACCES:
      return ec.value();
    default:
      return EIO;  // timeouts, lost connections, protocol errors: the file's user sees an I/O error
  }
}

bool representable_name(const std::string& name) noexcept {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

// One export in the mount. Immutable apart from its times (and edge_lock).
struct FuseFrontEnd::Node {
  fuse_ino_t ino = 0;
  std::string name;
  std::shared_ptr<core::Export> exp;
  uint64_t size = 0;
  uint32_t min_block = 1;  // the device's: requests off this grid are read-modify-written here
  bool read_only = false;
  // The device refused the final, partial block (size off its grid): logged.
  std::atomic<bool> tail_refused{false};
  // Held over every read-modify-write of a partial block (and the rest of
  // that request), so that two unaligned writes into one block cannot undo
  // each other. Aligned writes take it only while a read-modify-write is
  // pending (see AlignedWrite).
  core::AsyncMutex edge_lock;
  // Read-modify-writes waiting for or holding edge_lock.
  std::atomic<uint32_t> rmw_pending{0};
  int64_t created_ns = 0;
  // Written by every write (mtime), so the counter of aligned writes in
  // flight without the lock shares its cache line: no extra line bounces.
  std::atomic<int64_t> mtime_ns{0};
  std::atomic<uint32_t> aligned_unlocked{0};
};

// One open file description.
struct FuseFrontEnd::Handle {
  std::shared_ptr<Node> node;
  std::atomic<bool> wrote{false};  // since the last flush through this handle
};

struct FuseFrontEnd::Impl : std::enable_shared_from_this<FuseFrontEnd::Impl> {
  // mounting: mount() is probing DIR and calling mount(2) without the mutex
  // (a hung mount at DIR may block it for long); nothing else may start.
  enum class State { idle, mounting, mounted, unmounting };

  core::EventLoops& loops;
  core::ExportTable& exports;
  FuseOptions options;
  std::shared_ptr<spdlog::logger> log = core::logger("fuse");

  mutable std::mutex mutex;
  State state = State::idle;
  fuse_session* se = nullptr;
  int dead_end = -1;  // for end_session(se, ...)
  std::string dir;
  std::vector<std::shared_ptr<Reader>> readers;
  size_t readers_running = 0;
  std::unique_ptr<boost::asio::steady_timer> detach_timer;
  std::function<void()> on_unmounted;
  uint64_t observer_id = 0;
  int64_t mount_ns = 0;

  std::map<std::string, std::shared_ptr<Node>> by_name;
  std::unordered_map<fuse_ino_t, std::shared_ptr<Node>> by_ino;
  fuse_ino_t next_ino = FUSE_ROOT_ID + 1;

  // Open files: the kernel sends no RELEASE for those still open when a
  // session is cut off, so the rest are freed when it ends.
  std::unordered_set<Handle*> handles;

  // Requests being served by coroutines, plus kernel notifications queued.
  std::atomic<int64_t> inflight{0};

  Impl(core::EventLoops& l, core::ExportTable& e, FuseOptions o)
      : loops(l), exports(e), options(std::move(o)) {}

  void mount(const std::string& where);
  struct NewSession {
    fuse_session* session = nullptr;
    std::string dir;
    int dead_end = -1;  // see end_session()
  };
  NewSession mount_session(const std::string& where);
  void unmount();
  void reader_ended();
  void end_request() {
    if (inflight.fetch_sub(1, std::memory_order_acq_rel) == 1) check_finished();
  }
  void check_finished();
  void add_node(const std::shared_ptr<core::Export>& exp);  // mutex held
  void on_export(const std::shared_ptr<core::Export>& exp, core::ExportEvent event);

  std::shared_ptr<Node> find(fuse_ino_t ino, fuse_file_info* fi) {
    if (fi && fi->fh) return reinterpret_cast<Handle*>(fi->fh)->node;
    std::lock_guard lock(mutex);
    auto it = by_ino.find(ino);
    return it == by_ino.end() ? nullptr : it->second;
  }
  struct stat attr_of(const Node& n) const {
    struct stat st{};
    st.st_ino = n.ino;
    st.st_mode = S_IFREG | (n.read_only ? (options.mode & 0444) : options.mode);
    st.st_nlink = 1;
    st.st_uid = options.uid;
    st.st_gid = options.gid;
    st.st_size = static_cast<off_t>(n.size);
    st.st_blksize = 4096;
    st.st_blocks = static_cast<blkcnt_t>((n.size + 511) / 512);
    st.st_atim = to_timespec(n.created_ns);
    st.st_mtim = to_timespec(n.mtime_ns.load(std::memory_order_relaxed));
    st.st_ctim = to_timespec(std::max(n.created_ns, n.mtime_ns.load(std::memory_order_relaxed)));
    return st;
  }
  struct stat root_attr() const {
    struct stat st{};
    st.st_ino = FUSE_ROOT_ID;
    st.st_mode = S_IFDIR | 0755;
    st.st_nlink = 2;
    st.st_uid = options.uid;
    st.st_gid = options.gid;
    st.st_atim = st.st_mtim = st.st_ctim = to_timespec(mount_ns);
    return st;
  }
};

// Reads requests from one dup() of the /dev/fuse descriptor on one event
// loop. Asio's descriptor read tries read() before it waits and after every
// epoll event, so no request is left behind by an edge-triggered wakeup.
class FuseFrontEnd::Reader : public std::enable_shared_from_this<FuseFrontEnd::Reader> {
 public:
  Reader(Impl* impl, boost::asio::io_context& ctx, int fd) : impl_(impl), ctx_(ctx), sd_(ctx, fd), retry_(ctx) {}

  void start() { arm(); }
  // Any thread: closes the descriptor on its loop; the pending read ends.
  void stop() {
    boost::asio::post(sd_.get_executor(), [self = shared_from_this()] {
      boost::system::error_code ignored;
      self->sd_.close(ignored);
    });
  }
  boost::asio::any_io_executor executor() { return sd_.get_executor(); }
  [[nodiscard]] const boost::asio::io_context& context() const noexcept { return ctx_; }
  // True once in every `period` calls: the reader's share of large writes.
  bool take_write_turn(size_t period) noexcept { return ++write_turn_ % period == 0; }
  // The request being processed now: a write handler takes its buffer
  // instead of copying the payload out of it.
  [[nodiscard]] bool holds(const void* p) const noexcept {
    const auto* b = reinterpret_cast<const std::byte*>(p);
    return !buf_.empty() && b >= buf_.data() && b < buf_.data() + buf_.size();
  }
  IoBuffer take_buffer() { return std::move(buf_); }

  static thread_local Reader* current;

 private:
  void arm() {
    if (buf_.empty()) {
      // A write handler took the last buffer. Without memory for a new one,
      // wait and try again: an exception out of this handler would end the
      // loop's run().
      try {
        buf_ = new_receive_buffer();
      } catch (const std::bad_alloc&) {
        // Stopped meanwhile: end now, or unmount would wait for memory.
        if (!sd_.is_open()) return impl_->reader_ended();
        return retry_later();
      }
      if (starved_) {
        starved_ = false;
        impl_->log->info("FUSE: receive buffer allocated again; reading /dev/fuse");
      }
    }
    sd_.async_read_some(boost::asio::buffer(buf_.data(), buf_.size()),
                        [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                          self->on_read(ec, n);
                        });
  }

  // Called from a handler: nothing may throw out of it.
  void retry_later() noexcept {
    try {
      if (!starved_) {  // once per shortage, not every kReceiveRetry
        starved_ = true;
        impl_->log->error("FUSE: no memory for a {} KiB receive buffer; reading /dev/fuse again every {} ms",
                          kReceiveBuffer / 1024, kReceiveRetry.count());
      }
    } catch (...) {
    }
    try {
      retry_.expires_after(kReceiveRetry);
      // Not cancelled by stop(): once stop() closed the descriptor, arm()
      // ends the reader (a failed read, or at once while still short).
      retry_.async_wait([self = shared_from_this()](const boost::system::error_code&) { self->arm(); });
    } catch (...) {
      // Not even a timer: this reader ends (the others, if any, go on).
      boost::system::error_code ignored;
      sd_.close(ignored);
      impl_->reader_ended();
    }
  }

  void on_read(const boost::system::error_code& ec, size_t n) {
    if (ec) {
      // ENOENT: the request was interrupted before we read it.
      if (ec.value() == ENOENT || ec.value() == EINTR || ec.value() == EAGAIN) return arm();
      if (ec != boost::asio::error::operation_aborted && ec.value() != ENODEV &&
          ec != boost::asio::error::bad_descriptor)
        impl_->log->warn("reading /dev/fuse: {}", ec.message());
      boost::system::error_code ignored;
      sd_.close(ignored);
      impl_->reader_ended();
      return;
    }
    if (n >= kRequestHeader) {
      fuse_buf fb{};
      fb.size = n;
      fb.mem = buf_.data();
      current = this;
      fuse_session_process_buf(impl_->se, &fb);
      current = nullptr;
    }
    arm();
  }

  Impl* impl_;
  boost::asio::io_context& ctx_;
  boost::asio::posix::stream_descriptor sd_;
  size_t write_turn_ = 0;  // reader's loop only
  IoBuffer buf_;
  boost::asio::steady_timer retry_;  // waiting for memory for buf_
  bool starved_ = false;             // logged that buf_ could not be allocated
};

thread_local FuseFrontEnd::Reader* FuseFrontEnd::Reader::current = nullptr;

namespace {

using Impl = FuseFrontEnd::Impl;
using Node = FuseFrontEnd::Node;
using Handle = FuseFrontEnd::Handle;

Impl& impl_of(fuse_req_t req) { return *static_cast<Impl*>(fuse_req_userdata(req)); }

// errno for an exception that reached the edge of a request: ENOMEM for an
// allocation that failed, EIO for anything else. Call only inside a catch.
int errno_of_current_exception() noexcept {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return ENOMEM;
  } catch (...) {
    return EIO;
  }
}

void log_exception(Impl& impl, const char* where) noexcept {
  try {
    try {
      throw;
    } catch (const std::exception& e) {
      impl.log->error("a FUSE request failed in {}: {}", where, e.what());
    } catch (...) {
      impl.log->error("a FUSE request failed in {} with an exception", where);
    }
  } catch (...) {  // logging needs memory too
  }
}

// Starts `task` on the loop that read the request; its completion accounts
// for it. A coroutine that escapes with an exception has not replied yet
// (replies are their last step and do not throw), so it answers ENOMEM/EIO.
//
// Large transfers go to the next loop round-robin, so their copies run on
// other cores while the reader takes the next request; small ones stay on
// the reader's loop, where a hop would cost more than the work.
//
// Large writes (`write`) are placed differently: the reader has already paid
// one copy of their payload (the kernel's, into the receive buffer), about
// half of what writing it into the image costs. Round-robin left the
// reader's core with 1.5 copies per byte against 0.5 on the other (2 loops)
// and capped sequential writes; keeping every write off the reader's loop
// capped them on the other core instead. So the reader serves one large write
// in 2L (a quarter with 2 loops: both cores then copy about as much).
void spawn(fuse_req_t req, Task<void> task, size_t bytes = 0, bool write = false) {
  auto& impl = impl_of(req);
  impl.inflight.fetch_add(1, std::memory_order_relaxed);
  auto* reader = FuseFrontEnd::Reader::current;
  const size_t loops = impl.loops.size();
  boost::asio::any_io_executor ex;
  if (reader && (bytes < kSpreadBytes || (write && (loops == 1 || reader->take_write_turn(2 * loops))))) {
    ex = reader->executor();
  } else {
    auto* ctx = &impl.loops.next();
    if (write && reader && ctx == &reader->context()) ctx = &impl.loops.next();
    ex = ctx->get_executor();
  }
  try {
    boost::asio::co_spawn(ex, std::move(task), [self = impl.shared_from_this(), req](std::exception_ptr e) {
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (...) {
          log_exception(*self, "a coroutine");
          fuse_reply_err(req, errno_of_current_exception());
        }
      }
      self->end_request();
    });
  } catch (...) {
    // Not started (no memory for the handler): answer, then let go of it.
    fuse_reply_err(req, errno_of_current_exception());
    impl.end_request();
  }
}

// Runs an op with no exception escaping into libfuse's C frames (undefined
// behaviour). Every op replies as its last step and nothing after a reply
// throws, so an exception means no reply was sent: it gets ENOMEM or EIO.
// A try block costs nothing until something throws.
template <auto Op>
struct Guarded;
template <class... Args, void (*Op)(fuse_req_t, Args...)>
struct Guarded<Op> {
  static void call(fuse_req_t req, Args... args) noexcept {
    try {
      Op(req, args...);
    } catch (...) {
      log_exception(impl_of(req), "an operation");
      fuse_reply_err(req, errno_of_current_exception());
    }
  }
};

void reply_entry(fuse_req_t req, const Impl& impl, const Node& node) {
  fuse_entry_param e{};
  e.ino = node.ino;
  e.generation = 1;
  e.attr = impl.attr_of(node);
  e.attr_timeout = kAttrTimeout;
  e.entry_timeout = kAttrTimeout;
  fuse_reply_entry(req, &e);
}

void op_init(void* userdata, fuse_conn_info* conn) {
  auto& impl = *static_cast<Impl*>(userdata);
  conn->max_write = kMaxIo;
  conn->max_read = kMaxIo;  // must match the max_read mount option
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, kMaxIo);
  // Payloads go to a device buffer, not to an fd: splicing would add a copy.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  // Every write reaches the export before write(2) returns: the export's
  // write mode, not the kernel's page cache, decides what a flush means.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  // Let readahead and async direct I/O keep many requests in flight.
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  conn->time_gran = 1;
  try {
    impl.log->debug("FUSE session started (protocol {}.{}, max_write {})", conn->proto_major, conn->proto_minor,
                    conn->max_write);
  } catch (...) {  // called from libfuse's C code: nothing may escape
  }
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  auto& impl = impl_of(req);
  if (parent != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
  std::shared_ptr<Node> node;
  {
    std::lock_guard lock(impl.mutex);
    auto it = impl.by_name.find(name);
    if (it != impl.by_name.end()) node = it->second;
  }
  if (!node) return (void)fuse_reply_err(req, ENOENT);
  reply_entry(req, impl, *node);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto& impl = impl_of(req);
  if (ino == FUSE_ROOT_ID) {
    const auto st = impl.root_attr();
    return (void)fuse_reply_attr(req, &st, kAttrTimeout);
  }
  auto node = impl.find(ino, fi);
  if (!node) return (void)fuse_reply_err(req, ENOENT);
  const auto st = impl.attr_of(*node);
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
  auto& impl = impl_of(req);
  if (ino == FUSE_ROOT_ID) return (void)fuse_reply_err(req, EPERM);
  auto node = impl.find(ino, fi);
  if (!node) return (void)fuse_reply_err(req, ENOENT);
  // Owner and mode come from the configuration.
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) return (void)fuse_reply_err(req, EPERM);
  // An export has the size of its image: truncating to that size is a no-op,
  // any other size cannot be honoured.
  if ((to_set & FUSE_SET_ATTR_SIZE) && static_cast<uint64_t>(attr->st_size) != node->size)
    return (void)fuse_reply_err(req, node->read_only ? EROFS : EINVAL);
  if (to_set & FUSE_SET_ATTR_MTIME_NOW)
    node->mtime_ns.store(now_ns(), std::memory_order_relaxed);
  else if (to_set & FUSE_SET_ATTR_MTIME)
    node->mtime_ns.store(attr->st_mtim.tv_sec * 1000000000LL + attr->st_mtim.tv_nsec, std::memory_order_relaxed);
  const auto st = impl.attr_of(*node);
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  auto& impl = impl_of(req);
  if (ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
  std::vector<std::pair<std::string, struct stat>> entries;
  {
    std::lock_guard lock(impl.mutex);
    entries.reserve(impl.by_name.size() + 2);
    struct stat dir{};
    dir.st_ino = FUSE_ROOT_ID;
    dir.st_mode = S_IFDIR;
    entries.emplace_back(".", dir);
    entries.emplace_back("..", dir);
    for (const auto& [name, node] : impl.by_name) {
      struct stat st{};
      st.st_ino = node->ino;
      st.st_mode = S_IFREG;
      entries.emplace_back(name, st);
    }
  }
  std::vector<char> buf(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(std::max<off_t>(off, 0)); i < entries.size(); ++i) {
    const size_t need = fuse_add_direntry(req, buf.data() + used, size - used, entries[i].first.c_str(),
                                          &entries[i].second, static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto& impl = impl_of(req);
  if (ino == FUSE_ROOT_ID) return (void)fuse_reply_err(req, EISDIR);
  auto node = impl.find(ino, nullptr);
  if (!node) return (void)fuse_reply_err(req, ENOENT);
  if ((fi->flags & O_ACCMODE) != O_RDONLY && node->read_only) return (void)fuse_reply_err(req, EROFS);
  // Owned here until the table holds it: an insert that throws (no memory)
  // frees it, and the request gets ENOMEM from Guarded.
  auto owned = std::make_unique<Handle>(std::move(node));
  Handle* h = owned.get();
  {
    std::lock_guard lock(impl.mutex);
    impl.handles.insert(h);
  }
  owned.release();  // now the table's (freed at RELEASE or when the session ends)
  fi->fh = reinterpret_cast<uint64_t>(h);
  fi->direct_io = impl.options.direct_io ? 1 : 0;
  fi->keep_cache = 0;  // opening again shows what NBD clients wrote meanwhile
  // O_TRUNC arrives here (libfuse asks for atomic_o_trunc by default) and is
  // ignored, as a block device ignores it: a shell's `> FILE` overwrites from
  // the start and the file keeps its size and its other bytes.
  if (fuse_reply_open(req, fi) != 0) {  // the opener was interrupted: no release will come
    std::lock_guard lock(impl.mutex);
    impl.handles.erase(h);
    delete h;
  }
}

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  auto& impl = impl_of(req);
  auto* h = reinterpret_cast<Handle*>(fi->fh);
  {
    std::lock_guard lock(impl.mutex);
    impl.handles.erase(h);
  }
  delete h;
  fuse_reply_err(req, 0);
}

Task<void> do_read(fuse_req_t req, std::shared_ptr<Node> node, size_t n, uint64_t off) {
  IoBuffer buf(n);
  auto span = buf.span().first(n);
  const std::error_code ec = co_await node->exp->device->read(span, off, 0);
  if (ec)
    fuse_reply_err(req, fuse_errno(ec));
  else
    fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data()), n);
}

// Where the final block starts when it is partial (the image's size is off
// the device's grid); the image's size when there is none.
uint64_t partial_tail(const Node& node) noexcept {
  return node.size / node.min_block * node.min_block;
}

// Did the device refuse the final, partial block, for a request (or a
// read-modify-write) that reached `end`? A request from the grid to the
// image's end is the only way to that block; a remote that takes only whole
// blocks (nbdkit's blocksize-policy) answers EINVAL. Logged once per file.
bool tail_refused(Node& node, uint64_t end, std::error_code ec, spdlog::logger& log) noexcept {
  if (ec.value() != EINVAL || end <= partial_tail(node)) return false;
  if (!node.tail_refused.exchange(true, std::memory_order_relaxed)) {
    try {
      log.error("FUSE: {}: the device refuses the final {} bytes (the size {} is not a multiple of its "
                "{}-byte blocks, and it takes whole blocks only): reads and writes there fail with EIO",
                node.name, node.size - partial_tail(node), node.size, node.min_block);
    } catch (...) {
    }
  }
  return true;
}

// A read off the device's block grid: read the blocks that cover it (the
// last one ends at the image's end if it is partial), copy out. A read that
// reaches into a partial final block the device refuses fails with EIO, not
// short: the kernel takes a short read for the end of the file and would
// shrink the file's cached size. (Buffered readers still get every byte
// before that block: the kernel reads page by page after a failure.)
Task<void> do_read_unaligned(fuse_req_t req, std::shared_ptr<Node> node, size_t n, uint64_t off) {
  const uint64_t mb = node->min_block;
  const uint64_t first = off / mb * mb;
  const uint64_t last = std::min((off + n + mb - 1) / mb * mb, node->size);
  IoBuffer buf(static_cast<size_t>(last - first));
  auto span = buf.span().first(static_cast<size_t>(last - first));
  std::error_code ec = co_await node->exp->device->read(span, first, 0);
  if (ec && tail_refused(*node, last, ec, *impl_of(req).log)) ec = core::errno_code(EIO);
  if (ec)
    fuse_reply_err(req, fuse_errno(ec));
  else
    fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data() + (off - first)), n);
}

bool off_grid(const Node& node, uint64_t off, uint64_t n) noexcept {
  return node.min_block > 1 && (off % node.min_block != 0 || n % node.min_block != 0);
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  auto node = reinterpret_cast<Handle*>(fi->fh)->node;
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  const auto offset = static_cast<uint64_t>(off);
  if (offset >= node->size || size == 0) return (void)fuse_reply_buf(req, nullptr, 0);  // end of file
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, node->size - offset));
  if (off_grid(*node, offset, n)) return spawn(req, do_read_unaligned(req, std::move(node), n, offset), n);
  spawn(req, do_read(req, std::move(node), n, offset), n);
}

// One block of the device's grid, read, patched at [from, from + len) with
// src (nullptr: zeroes), and written back. The caller holds edge_lock.
Task<std::error_code> patch_block(Node& node, uint64_t block, uint64_t from, size_t len, const std::byte* src,
                                  core::IoFlags flags) {
  // The final block of an image whose size is off the grid ends at the image's end.
  const auto bytes = static_cast<size_t>(std::min<uint64_t>(node.min_block, node.size - block));
  IoBuffer buf(bytes);
  std::error_code ec;
  if (from != block || len != bytes) {  // a patch of all of it needs no read
    auto in = buf.span().first(bytes);
    ec = co_await node.exp->device->read(in, block, 0);
    if (ec) co_return ec;
  }
  std::byte* at = buf.data() + (from - block);
  if (src)
    std::memcpy(at, src, len);
  else
    std::memset(at, 0, len);
  const std::span<const std::byte> out(buf.data(), bytes);
  ec = co_await node.exp->device->write(out, block, flags);
  co_return ec;
}

// Writes [off, off + n) on a device with min_block > 1 where off or n is off
// its grid: the partial blocks at either end are read, patched and written
// back; the whole blocks between go down as they are (src: straight from
// the request; nullptr: WRITE_ZEROES with zero_flags). The caller holds
// edge_lock, so unaligned requests into the same block take turns.
Task<std::error_code> write_off_grid(Node& node, uint64_t off, uint64_t n, const std::byte* src,
                                     core::IoFlags flags, core::IoFlags zero_flags) {
  const uint64_t mb = node.min_block;
  const uint64_t end = off + n;
  uint64_t pos = off;
  std::error_code ec;
  if (off % mb != 0) {
    const uint64_t block = off / mb * mb;
    const uint64_t stop = std::min(end, block + mb);
    ec = co_await patch_block(node, block, off, static_cast<size_t>(stop - off), src, flags);
    if (ec) co_return ec;
    pos = stop;
  }
  const uint64_t whole_end = std::max(pos, end / mb * mb);
  if (whole_end > pos) {
    if (src) {
      const std::span<const std::byte> middle(src + (pos - off), static_cast<size_t>(whole_end - pos));
      ec = co_await node.exp->device->write(middle, pos, flags);
    } else {
      ec = co_await node.exp->device->zero(ByteRange{pos, whole_end - pos}, zero_flags);
    }
    if (ec) co_return ec;
    pos = whole_end;
  }
  if (pos < end) {  // a partial block at the end; pos is on the grid here
    const std::byte* tail = src ? src + (pos - off) : nullptr;
    ec = co_await patch_block(node, pos, pos, static_cast<size_t>(end - pos), tail, flags);
  }
  co_return ec;
}

// Orders an aligned write (or zeroing) against read-modify-writes on a
// device with min_block > 1. Without it, an RMW that read a block before an
// aligned write of that block landed would write the old bytes back after it.
//
// The cheap case, no RMW pending on the file: the write counts itself in
// aligned_unlocked and goes ahead without the lock. Otherwise it queues on
// edge_lock behind the pending RMWs. An RMW, holding edge_lock, waits until
// aligned_unlocked is zero. Both sides increment their own counter before
// reading the other's (sequentially consistent), so at least one of them
// sees the other. The lock is per file, not per block: an aligned write
// waits for any RMW of its file (they are rare: off-grid requests).
class AlignedWrite {
 public:
  // No coroutine frame on the way: the lock, when needed, is taken with wait().
  explicit AlignedWrite(Node& node) noexcept : node_(node) {
    if (node.min_block == 1) return;  // no RMW ever: nothing to order
    node.aligned_unlocked.fetch_add(1, std::memory_order_seq_cst);
    if (node.rmw_pending.load(std::memory_order_seq_cst) == 0) {
      counted_ = true;
      return;
    }
    node.aligned_unlocked.fetch_sub(1, std::memory_order_release);
    must_wait_ = true;
  }
  [[nodiscard]] bool must_wait() const noexcept { return must_wait_; }
  // Queues behind the pending RMWs, then counts itself like a write that
  // went ahead and lets the lock go at once: the lock is only a barrier (an
  // RMW queued after it waits for the count), so writes that waited still
  // run in parallel with each other.
  Task<void> wait() {
    auto guard = co_await node_.edge_lock.lock();
    node_.aligned_unlocked.fetch_add(1, std::memory_order_seq_cst);
    counted_ = true;
  }
  AlignedWrite(const AlignedWrite&) = delete;
  AlignedWrite& operator=(const AlignedWrite&) = delete;
  ~AlignedWrite() {
    if (counted_) node_.aligned_unlocked.fetch_sub(1, std::memory_order_release);
  }

 private:
  Node& node_;
  bool counted_ = false;
  bool must_wait_ = false;
};

// Holds edge_lock for a read-modify-write, once no aligned write that went
// ahead without the lock is in flight any more (see AlignedWrite).
class EdgeLock {
 public:
  static Task<EdgeLock> lock(Node& node) {
    node.rmw_pending.fetch_add(1, std::memory_order_seq_cst);
    EdgeLock held(&node);  // counted from here: any exit below undoes it
    auto guard = co_await node.edge_lock.lock();
    held.guard_.emplace(std::move(guard));
    if (node.aligned_unlocked.load(std::memory_order_seq_cst) != 0) {
      // Aligned writes started before this RMW was counted: they take a
      // device round trip at most. Later ones queue behind the lock.
      const auto ex = co_await boost::asio::this_coro::executor;
      boost::asio::steady_timer timer(ex);
      // 100 us first, doubling up to 10 ms: a write stuck on a slow or
      // reconnecting remote is not polled 10,000 times a second.
      auto pause = std::chrono::microseconds(100);
      while (node.aligned_unlocked.load(std::memory_order_seq_cst) != 0) {
        timer.expires_after(pause);
        co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(10));
      }
    }
    co_return held;
  }
  EdgeLock(EdgeLock&& o) noexcept : node_(std::exchange(o.node_, nullptr)), guard_(std::move(o.guard_)) {
    o.guard_.reset();
  }
  EdgeLock& operator=(EdgeLock&&) = delete;
  ~EdgeLock() {
    guard_.reset();  // the next in line may start
    if (node_) node_->rmw_pending.fetch_sub(1, std::memory_order_release);
  }

 private:
  explicit EdgeLock(Node* node) : node_(node) {}
  Node* node_;
  std::optional<core::AsyncMutex::Guard> guard_;
};

// The last step of every write: the error, or the new mtime and the count.
void reply_written(fuse_req_t req, Node& node, std::error_code ec, size_t n) {
  if (ec) {
    fuse_reply_err(req, fuse_errno(ec));
    return;
  }
  node.mtime_ns.store(now_ns(), std::memory_order_relaxed);
  fuse_reply_write(req, n);
}

Task<void> do_write(fuse_req_t req, std::shared_ptr<Node> node, IoBuffer owner, const std::byte* data, size_t n,
                    uint64_t off, core::IoFlags flags) {
  const std::span<const std::byte> payload(data, n);
  std::error_code ec;
  {
    AlignedWrite pass(*node);
    if (pass.must_wait()) co_await pass.wait();
    ec = co_await node->exp->device->write(payload, off, flags);
  }
  owner.reset();
  reply_written(req, *node, ec, n);
}

Task<void> do_write_unaligned(fuse_req_t req, std::shared_ptr<Node> node, IoBuffer owner, const std::byte* data,
                              size_t n, uint64_t off, core::IoFlags flags) {
  std::error_code ec;
  size_t written = n;
  {
    auto guard = co_await EdgeLock::lock(*node);
    // The partial final block goes last, on its own: a device that refuses
    // it still takes the rest, and the write is short up to it.
    const uint64_t tail = partial_tail(*node);
    const uint64_t end = off + n;
    const uint64_t split = std::clamp(tail, off, end);
    if (split > off) ec = co_await write_off_grid(*node, off, split - off, data, flags, 0);
    if (!ec && end > split) {
      ec = co_await write_off_grid(*node, split, end - split, data + (split - off), flags, 0);
      if (ec && tail_refused(*node, end, ec, *impl_of(req).log)) {
        ec = split > off ? std::error_code{} : core::errno_code(EIO);
        written = static_cast<size_t>(split - off);
      }
    }
  }
  owner.reset();
  reply_written(req, *node, ec, written);
}

void op_write(fuse_req_t req, fuse_ino_t, const char* data, size_t size, off_t off, fuse_file_info* fi) {
  auto* h = reinterpret_cast<Handle*>(fi->fh);
  auto node = h->node;
  if (node->read_only) return (void)fuse_reply_err(req, EROFS);
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  const auto offset = static_cast<uint64_t>(off);
  if (size == 0) return (void)fuse_reply_write(req, 0);
  // The file cannot grow: like a block device, a write at the end has no space.
  if (offset >= node->size) return (void)fuse_reply_err(req, ENOSPC);
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, node->size - offset));
  IoBuffer owner;
  const std::byte* payload = reinterpret_cast<const std::byte*>(data);
  auto* reader = FuseFrontEnd::Reader::current;
  if (reader && reader->holds(data)) {
    owner = reader->take_buffer();  // zero copy: the reader gets a fresh buffer
  } else {
    owner = IoBuffer(n);
    std::memcpy(owner.data(), data, n);
    payload = owner.data();
  }
  // O_SYNC/O_DSYNC opens make every write durable before it is acknowledged.
  const core::IoFlags flags = (fi->flags & O_DSYNC) ? core::kFua : 0;
  h->wrote.store(true, std::memory_order_relaxed);
  if (off_grid(*node, offset, n))
    return spawn(req, do_write_unaligned(req, std::move(node), std::move(owner), payload, n, offset, flags), n);
  spawn(req, do_write(req, std::move(node), std::move(owner), payload, n, offset, flags), n, /*write=*/true);
}

Task<void> do_flush(fuse_req_t req, std::shared_ptr<Node> node) {
  const std::error_code ec = co_await node->exp->device->flush();
  fuse_reply_err(req, fuse_errno(ec));
}

// close(): flushes only if this file description wrote since its last flush,
// as an NBD client's disconnect does; a failed flush reaches close() as EIO.
void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  auto* h = reinterpret_cast<Handle*>(fi->fh);
  if (!h->wrote.exchange(false, std::memory_order_acq_rel)) return (void)fuse_reply_err(req, 0);
  spawn(req, do_flush(req, h->node));
}

// fsync and fdatasync: the export's FLUSH (its write mode decides how far the
// data goes: the remote for writethrough/writeback, the local cache for
// writeback-local, the disk for a file).
void op_fsync(fuse_req_t req, fuse_ino_t, int /*datasync*/, fuse_file_info* fi) {
  auto* h = reinterpret_cast<Handle*>(fi->fh);
  h->wrote.store(false, std::memory_order_relaxed);
  spawn(req, do_flush(req, h->node));
}

Task<void> do_zero(fuse_req_t req, std::shared_ptr<Node> node, ByteRange range, core::IoFlags flags) {
  std::error_code ec;
  if (off_grid(*node, range.offset, range.length)) {
    // Partial blocks at the edges get zeroes written into them; the whole
    // blocks between are zeroed (or deallocated) by the device.
    auto guard = co_await EdgeLock::lock(*node);
    ec = co_await write_off_grid(*node, range.offset, range.length, nullptr, 0, flags);
  } else {
    AlignedWrite pass(*node);
    if (pass.must_wait()) co_await pass.wait();
    ec = co_await node->exp->device->zero(range, flags);
  }
  if (ec && tail_refused(*node, range.end(), ec, *impl_of(req).log)) ec = core::errno_code(EIO);
  if (!ec) node->mtime_ns.store(now_ns(), std::memory_order_relaxed);
  fuse_reply_err(req, fuse_errno(ec));
}

void op_fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi) {
  auto* h = reinterpret_cast<Handle*>(fi->fh);
  const auto& node = h->node;
  constexpr int kKnown = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if (mode & ~kKnown) return (void)fuse_reply_err(req, EOPNOTSUPP);
  if (node->read_only) return (void)fuse_reply_err(req, EROFS);
  if (off < 0 || len <= 0 || off > LLONG_MAX - len) return (void)fuse_reply_err(req, EINVAL);
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  uint64_t start = static_cast<uint64_t>(off);
  uint64_t end = start + static_cast<uint64_t>(len);
  if (end > node->size) {
    if (!keep_size) return (void)fuse_reply_err(req, ENOSPC);  // the file cannot grow
    end = node->size;
  }
  if (start >= end || !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
    return (void)fuse_reply_err(req, 0);  // plain allocation: the image already has its size
  h->wrote.store(true, std::memory_order_relaxed);
  // PUNCH_HOLE promises zeroes afterwards, which an advisory TRIM does not:
  // it is WRITE_ZEROES that may deallocate (the file backend punches a hole).
  // ZERO_RANGE keeps the range allocated: WRITE_ZEROES with NO_HOLE.
  const core::IoFlags flags = (mode & FALLOC_FL_PUNCH_HOLE) ? 0 : core::kNoHole;
  spawn(req, do_zero(req, node, ByteRange{start, end - start}, flags));
}

Task<void> do_lseek(fuse_req_t req, std::shared_ptr<Node> node, uint64_t from, int whence) {
  const uint64_t size = node->size;
  // Block status is asked from the device's grid; the answer is never before `from`.
  uint64_t pos = from / node->min_block * node->min_block;
  while (pos < size) {
    ExtentList extents;
    std::error_code ec = co_await node->exp->device->block_status(ByteRange{pos, size - pos}, extents);
    if (!ec && extents.empty()) ec = core::errno_code(EIO);
    if (ec) {
      fuse_reply_err(req, fuse_errno(ec));
      co_return;
    }
    for (const auto& e : extents) {
      const bool hole = e.flags & core::kExtentHole;
      if ((whence == SEEK_DATA ? !hole : hole) && pos + e.length > from) {
        fuse_reply_lseek(req, static_cast<off_t>(std::max(pos, from)));
        co_return;
      }
      if (e.length == 0) {  // a device bug: do not loop forever
        fuse_reply_err(req, EIO);
        co_return;
      }
      pos = std::min(size, pos + e.length);
      if (pos >= size) break;
    }
  }
  // No data after pos; the end of the file is an implicit hole.
  if (whence == SEEK_DATA)
    fuse_reply_err(req, ENXIO);
  else
    fuse_reply_lseek(req, static_cast<off_t>(size));
}

void op_lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  auto node = reinterpret_cast<Handle*>(fi->fh)->node;
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return (void)fuse_reply_err(req, EINVAL);
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  if (static_cast<uint64_t>(off) >= node->size) return (void)fuse_reply_err(req, ENXIO);
  spawn(req, do_lseek(req, std::move(node), static_cast<uint64_t>(off), whence));
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  auto& impl = impl_of(req);
  struct statvfs st{};
  uint64_t bytes = 0;
  size_t files = 0;
  {
    std::lock_guard lock(impl.mutex);
    for (const auto& [name, node] : impl.by_name) bytes += node->size;
    files = impl.by_name.size();
  }
  st.f_bsize = 4096;
  st.f_frsize = 4096;
  st.f_blocks = (bytes + 4095) / 4096;
  st.f_files = files + 1;
  st.f_namemax = 255;
  fuse_reply_statfs(req, &st);
}

const fuse_lowlevel_ops& operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o{};
    o.init = op_init;
    o.lookup = Guarded<op_lookup>::call;
    o.getattr = Guarded<op_getattr>::call;
    o.setattr = Guarded<op_setattr>::call;
    o.readdir = Guarded<op_readdir>::call;
    o.open = Guarded<op_open>::call;
    o.release = Guarded<op_release>::call;
    o.read = Guarded<op_read>::call;
    o.write = Guarded<op_write>::call;
    o.flush = Guarded<op_flush>::call;
    o.fsync = Guarded<op_fsync>::call;
    o.fallocate = Guarded<op_fallocate>::call;
    o.lseek = Guarded<op_lseek>::call;
    o.statfs = Guarded<op_statfs>::call;
    return o;
  }();
  return ops;
}

}  // namespace

void Impl::add_node(const std::shared_ptr<core::Export>& exp) {
  if (!representable_name(exp->name)) {
    log->warn("export '{}' has a name that cannot be a file name; not shown in the FUSE mount", exp->name);
    return;
  }
  auto node = std::make_shared<Node>();
  node->ino = next_ino++;
  node->name = exp->name;
  node->exp = exp;
  node->size = exp->device->geometry().size;
  node->min_block = std::max<uint32_t>(exp->device->geometry().min_block, 1);
  node->read_only = exp->device->capabilities().read_only;
  node->created_ns = now_ns();
  node->mtime_ns.store(node->created_ns, std::memory_order_relaxed);
  by_ino[node->ino] = node;
  by_name[node->name] = std::move(node);
}

void Impl::on_export(const std::shared_ptr<core::Export>& exp, core::ExportEvent event) {
  std::lock_guard lock(mutex);
  if (event == core::ExportEvent::added) {
    if (by_name.count(exp->name)) return;
    add_node(exp);
  } else {
    auto it = by_name.find(exp->name);
    if (it == by_name.end() || it->second->exp != exp) return;
    by_ino.erase(it->second->ino);
    by_name.erase(it);
  }
  if (state != State::mounted || !se) return;
  // The kernel caches names and the directory listing; tell it. These calls
  // may wait for the kernel, which may be waiting for one of our replies:
  // never on a loop thread.
  inflight.fetch_add(1, std::memory_order_relaxed);
  boost::asio::post(loops.blocking(), [self = shared_from_this(), name = exp->name] {
    fuse_lowlevel_notify_inval_entry(self->se, FUSE_ROOT_ID, name.c_str(), name.size());
    fuse_lowlevel_notify_inval_inode(self->se, FUSE_ROOT_ID, 0, 0);
    self->end_request();
  });
}

// Probes DIR, detaches a stale mount there, creates the directory if
// missing, and mounts a new session on it. Returns the session, the
// canonical directory and the pipe end end_session() needs. Throws
// std::runtime_error. Called without the mutex: every step here may wait for
// whatever is mounted at DIR.
Impl::NewSession Impl::mount_session(const std::string& where) {
  const auto timeout = options.mount_timeout;
  auto hung = [&](const std::string& path) {
    return std::runtime_error("FUSE: " + path + " did not answer within " + std::to_string(timeout.count()) +
                              " ms (a hung mount there, e.g. a FUSE server that is stopped?); not mounted");
  };
  // Only calls that may wait for a mount at DIR run bounded, on a thread of
  // their own; what they find is acted on here (an abandoned probe changes
  // nothing).
  const auto probed = run_bounded<DirProbe>([where] { return probe_dir(where); }, timeout);
  if (!probed) {
    std::error_code fec;
    throw hung(std::filesystem::absolute(where, fec).lexically_normal().string());
  }
  const std::string path = probed->path;
  if (probed->fuse_mount || probed->statvfs_errno != 0) {
    const int e = probed->fuse_mount && probed->statvfs_errno == 0 ? EEXIST : probed->statvfs_errno;
    if (probed->fuse_mount && e == EEXIST)
      throw std::runtime_error("FUSE: " + path + " is already a FUSE mount (another blockwayd running?)");
    if (probed->fuse_mount && (e == ENOTCONN || e == ECONNABORTED)) {
      // Only a FUSE mount listed at this very path: a dead mount found by
      // following a symlink elsewhere is not ours to take down.
      log->warn("FUSE: {} is a stale mount ({}); detaching it", path, std::strerror(e));
      if (!detach_mount(path)) throw std::runtime_error("FUSE: cannot detach the stale mount at " + path);
    } else if (e == ENOENT) {
      std::error_code fec;
      std::filesystem::create_directories(path, fec);
      if (fec) throw std::runtime_error("FUSE: cannot create " + path + ": " + fec.message());
    } else if (e != 0) {
      throw std::runtime_error("FUSE: cannot use " + path + ": " + std::strerror(e));
    }
  }
  struct Stat {
    int err = 0;
    mode_t mode = 0;
  };
  const auto st = run_bounded<Stat>(
      [path] {
        struct stat s{};
        return ::stat(path.c_str(), &s) == 0 ? Stat{0, s.st_mode} : Stat{errno, 0};
      },
      timeout);
  if (!st) throw hung(path);
  if (st->err != 0) throw std::runtime_error("FUSE: cannot use " + path + ": " + std::strerror(st->err));
  if (!S_ISDIR(st->mode)) throw std::runtime_error("FUSE: " + path + " is not a directory");

  std::string mount_opts = "fsname=blockway,subtype=blockway,default_permissions,max_read=" + std::to_string(kMaxIo);
  if (options.allow_other) mount_opts += ",allow_other";
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

void Impl::mount(const std::string& where) {
  {
    std::lock_guard lock(mutex);
    if (state == State::mounting) throw std::runtime_error("FUSE: a mount is already being made");
    if (state != State::idle) throw std::runtime_error("FUSE: already mounted at " + dir);
    state = State::mounting;
  }
  NewSession fresh;
  try {
    fresh = mount_session(where);
    const std::string& path = fresh.dir;
    std::lock_guard lock(mutex);
    dir = path;
    mount_ns = now_ns();
    by_name.clear();
    by_ino.clear();
    for (const auto& exp : exports.list()) add_node(exp);
    const int fd = fuse_session_fd(fresh.session);
    readers.clear();
    // Every reader's epoll wakes for every request (no EPOLLEXCLUSIVE in
    // Asio), so readers beyond one cost a wasted wakeup per request; see
    // docs/architecture.md. Loops 1.. serve large transfers either way.
    const size_t nreaders = std::clamp<size_t>(options.readers, 1, loops.size());
    for (size_t i = 0; i < nreaders; ++i) {
      const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
      if (copy < 0) break;
      readers.push_back(std::make_shared<Reader>(this, loops.at(i), copy));
    }
    readers_running = readers.size();
    se = fresh.session;
    dead_end = fresh.dead_end;
    state = State::mounted;
    // From here on the session is live: the readers start, and a failure to
    // log is no reason to take the mount down.
    for (auto& r : readers) boost::asio::post(r->executor(), [r] { r->start(); });
    try {
      log->info("FUSE: {} export(s) as files in {} ({} reader loops{}{})", by_name.size(), path, readers.size(),
                options.direct_io ? ", direct I/O" : "", options.allow_other ? ", allow_other" : "");
    } catch (...) {
    }
  } catch (...) {
    std::function<void()> done;
    {
      std::lock_guard lock(mutex);
      readers.clear();  // not started, unless posting a later one failed for want of memory (not handled)
      readers_running = 0;
      se = nullptr;
      dead_end = -1;
      state = State::idle;
      done = on_unmounted;
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

void Impl::unmount() {
  std::lock_guard lock(mutex);
  if (state != State::mounted) return;
  state = State::unmounting;
  log->info("FUSE: unmounting {}", dir);
  boost::asio::post(loops.blocking(), [self = shared_from_this(), path = dir] {
    // A plain umount succeeds when no file is open; the kernel then ends the
    // session and every reader sees ENODEV.
    if (::umount2(path.c_str(), 0) == 0) return;
    const int e = errno;
    if (e == EBUSY) {
      // Open files (a loop device, a VM): take the mount out of the namespace
      // now, keep serving them for a while, then cut them off.
      self->log->warn("FUSE: {} is busy; detached, its open files are served for up to {} s", path,
                      self->options.shutdown_timeout.count() / 1000);
      (void)detach_mount(path);
    } else if (e != EINVAL && e != ENOENT) {
      self->log->warn("FUSE: umount {}: {}", path, std::strerror(e));
      (void)detach_mount(path);
    }
    std::lock_guard lock(self->mutex);
    if (self->state != State::unmounting) return;
    self->detach_timer = std::make_unique<boost::asio::steady_timer>(self->loops.at(0), self->options.shutdown_timeout);
    self->detach_timer->async_wait([self](const boost::system::error_code& ec) {
      if (ec) return;
      std::lock_guard lock(self->mutex);
      if (self->state != State::unmounting) return;
      self->log->warn("FUSE: files on {} still open after the shutdown timeout; ending the session", self->dir);
      for (auto& r : self->readers) r->stop();
    });
  });
}

void Impl::reader_ended() {
  {
    std::lock_guard lock(mutex);
    if (readers_running > 0) --readers_running;
    if (state == State::mounted) {
      // Unmounted from outside (fusermount -u, umount): end the session too.
      log->warn("FUSE: {} was unmounted from outside", dir);
      state = State::unmounting;
    }
    if (state == State::unmounting)
      for (auto& r : readers) r->stop();  // the others end too (ENODEV, or now)
  }
  check_finished();
}

void Impl::check_finished() {
  std::function<void()> done;
  {
    std::lock_guard lock(mutex);
    if (state != State::unmounting || readers_running != 0 || inflight.load(std::memory_order_acquire) != 0 || !se)
      return;
    // No reader and no request left: nothing can write to se's fd any more.
    fuse_session* old = se;
    se = nullptr;
    if (detach_timer) {
      boost::asio::post(loops.at(0), [t = std::shared_ptr<boost::asio::steady_timer>(std::move(detach_timer))] {
        t->cancel();
      });
    }
    readers.clear();
    state = State::idle;
    // The mount is already gone (or detached): close the last descriptor,
    // without a second umount by path.
    end_session(old, std::exchange(dead_end, -1));
    for (auto* h : handles) delete h;  // files still open when the session was cut off
    handles.clear();
    log->info("FUSE: {} unmounted", dir);
    done = on_unmounted;
  }
  if (done) done();
}

FuseFrontEnd::FuseFrontEnd(core::EventLoops& loops, core::ExportTable& exports, FuseOptions options)
    : impl_(std::make_shared<Impl>(loops, exports, std::move(options))) {
  std::weak_ptr<Impl> weak = impl_;
  impl_->observer_id = exports.subscribe([weak](const std::shared_ptr<core::Export>& exp, core::ExportEvent ev) {
    if (auto impl = weak.lock()) impl->on_export(exp, ev);
  });
}

FuseFrontEnd::~FuseFrontEnd() {
  impl_->exports.unsubscribe(impl_->observer_id);
  std::lock_guard lock(impl_->mutex);
  if (impl_->se) {
    // The loops are gone (start-up failed after mounting): tear down directly.
    // Once unmounting, the directory is no longer ours: something else may
    // be mounted there by now.
    if (impl_->state == Impl::State::mounted)
      (void)::umount2(impl_->dir.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);
    impl_->readers.clear();
    end_session(impl_->se, std::exchange(impl_->dead_end, -1));
    impl_->se = nullptr;
    for (auto* h : impl_->handles) delete h;
    impl_->handles.clear();
  }
}

void fail_receive_buffers_for_test(int count) noexcept {
  receive_failures_to_inject.store(count, std::memory_order_relaxed);
}

void FuseFrontEnd::mount(const std::string& dir) { impl_->mount(dir); }
void FuseFrontEnd::unmount() { impl_->unmount(); }

void FuseFrontEnd::set_on_unmounted(std::function<void()> fn) {
  std::lock_guard lock(impl_->mutex);
  impl_->on_unmounted = std::move(fn);
}

bool FuseFrontEnd::active() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->state != Impl::State::idle;
}

std::string FuseFrontEnd::mountpoint() const {
  std::lock_guard lock(impl_->mutex);
  const bool has_dir = impl_->state == Impl::State::mounted || impl_->state == Impl::State::unmounting;
  return has_dir ? impl_->dir : std::string();
}

}  // namespace blockway::fuse
