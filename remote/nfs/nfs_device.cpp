#include "remote/nfs/nfs_device.hpp"
#include "remote/command_slots.hpp"

#include "core/logging.hpp"
#include "remote/completion.hpp"
#include "remote/fd_watcher.hpp"
#include "remote/registry.hpp"

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>

#include <fcntl.h>
#include <nfsc/libnfs.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <list>
#include <string_view>
#include <random>
#include <utility>

// Exported by libnfs 4.0 but missing from its public header: frees an open
// file's handle without an RPC, for sessions whose connection is already gone.
extern "C" void nfs_free_nfsfh(struct nfsfh* nfsfh);

// libnfs 4.0's nfs_destroy_context() does not free the NFSv4 client name
// that nfs4_set_client_name() strdup()s (fixed in later libnfs): a few bytes
// per session. LeakSanitizer reads this hook in sanitizer builds; it is
// unused otherwise.
extern "C" const char* __lsan_default_suppressions() { return "leak:nfs4_set_client_name\n"; }

namespace blockway::remote {

using core::ByteRange;
using core::errno_code;
using core::ExtentList;
using core::IoFlags;
using core::Support;
using core::Task;
using Clock = std::chrono::steady_clock;

namespace {

using Handler = std::unique_ptr<Completion>;

constexpr uint64_t kMaxTransfer = 32u << 20;
constexpr uint32_t kNfs4WriteMax = 3072;

struct ContextCloser {
  void operator()(nfs_context* c) const noexcept { nfs_destroy_context(c); }
};
using ContextPtr = std::unique_ptr<nfs_context, ContextCloser>;

std::string context_error(nfs_context* ctx) {
  const char* m = ctx != nullptr ? nfs_get_error(ctx) : nullptr;
  return m != nullptr && *m != '\0' ? m : "unknown libnfs error";
}

// libnfs reports RPC-level failures (socket gone, command cancelled or timed
// out) as -EFAULT and -EINTR; NFS status codes map to other errno values.
bool is_rpc_failure(int err) {
  return err == EFAULT || err == EINTR || core::is_connection_error(errno_code(err));
}

// NFSv4 errors that mean the server no longer knows our client or open
// state (lease expired, server restarted, state revoked): libnfs maps them
// to -EIO and names them only in its message. A fresh session (new client
// id, new OPEN) cures them, so they count as a lost session.
bool lost_nfs4_state(const void* message) {
  if (message == nullptr) return false;
  const std::string_view m(static_cast<const char*>(message));
  for (const char* code : {"NFS4ERR_EXPIRED", "NFS4ERR_STALE_CLIENTID", "NFS4ERR_STALE_STATEID",
                           "NFS4ERR_BAD_STATEID", "NFS4ERR_ADMIN_REVOKED", "NFS4ERR_OLD_STATEID"})
    if (m.find(code) != std::string_view::npos) return true;
  return false;
}

// One step of the blocking set-up, driven by poll() with a deadline.
struct SyncCall {
  bool done = false;
  int status = 0;
  std::string message;
  nfsfh* fh = nullptr;
  nfs_stat_64 st{};
  bool want_fh = false;
  bool want_stat = false;

  static void callback(int status, nfs_context* /*nfs*/, void* data, void* priv) {
    auto* c = static_cast<SyncCall*>(priv);
    c->done = true;
    c->status = status;
    if (status < 0) {
      if (data != nullptr) c->message = static_cast<const char*>(data);
      return;
    }
    if (c->want_fh) c->fh = static_cast<nfsfh*>(data);
    if (c->want_stat && data != nullptr) c->st = *static_cast<nfs_stat_64*>(data);
  }
};

}  // namespace

// A mounted session with the image open: made on a blocking thread, then
// handed to a Connection on its loop.
struct NfsDevice::Session {
  ContextPtr ctx;
  nfsfh* fh = nullptr;
  nfsfh* fh_stable = nullptr;  // NFSv3: opened O_SYNC, its WRITEs are FILE_SYNC (for FUA)
  uint64_t size = 0;
  bool read_only = false;
  uint64_t read_max = 0;
  uint64_t write_max = 0;
  int err = 0;
  std::string message;

  Session() = default;
  Session(Session&& o) noexcept { *this = std::move(o); }
  Session& operator=(Session&& o) noexcept {
    if (this == &o) return *this;
    release();
    ctx = std::move(o.ctx);
    fh = std::exchange(o.fh, nullptr);
    fh_stable = std::exchange(o.fh_stable, nullptr);
    size = o.size;
    read_only = o.read_only;
    read_max = o.read_max;
    write_max = o.write_max;
    err = o.err;
    message = std::move(o.message);
    return *this;
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() { release(); }
  // Frees the file handle locally and destroys the context.
  void release() {
    if (fh != nullptr) nfs_free_nfsfh(fh);
    if (fh_stable != nullptr) nfs_free_nfsfh(fh_stable);
    fh = nullptr;
    fh_stable = nullptr;
    ctx.reset();
  }
};

namespace {

std::atomic<uint64_t> g_session_counter{0};

// Waits until `call` completed, the deadline passed or the connection
// failed; false (with `why`) unless it completed.
bool wait_for(nfs_context* ctx, SyncCall& call, Clock::time_point deadline, std::string& why) {
  while (!call.done) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      why = "no answer from the server in time";
      return false;
    }
    pollfd p{nfs_get_fd(ctx), static_cast<short>(nfs_which_events(ctx)), 0};
    const int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 200)));
    if (rc < 0 && errno != EINTR) {
      why = std::string("poll: ") + std::strerror(errno);
      return false;
    }
    if (nfs_service(ctx, rc > 0 ? p.revents : 0) < 0) {
      why = "the connection failed (" + (call.done && !call.message.empty() ? call.message : context_error(ctx)) +
            "; is an NFS server listening there?)";
      return false;
    }
  }
  return true;
}

// Mounts the export and opens and measures the image, each step bounded by
// `timeout`. Blocking: call at start-up or on the blocking pool.
NfsDevice::Session connect_session(const NfsTarget& t, bool read_only, std::chrono::milliseconds timeout) {
  NfsDevice::Session s;
  // The calls' results live outside the context, which is destroyed first on
  // failure (libnfs may still call back while it is torn down).
  SyncCall mount, open, stat;
  auto fail = [&s](int err, std::string message) {
    s.release();
    s.err = err;
    s.message = std::move(message);
    return std::move(s);
  };
  s.ctx.reset(nfs_init_context());
  nfs_context* ctx = s.ctx.get();
  if (ctx == nullptr) return fail(ENOMEM, "cannot create an NFS context");
  nfs_set_autoreconnect(ctx, 0);  // RetryLayer decides when and how long
  const std::string settings = t.libnfs_settings_url();
  nfs_url* url = nfs_parse_url_incomplete(ctx, settings.c_str());
  if (url == nullptr) return fail(EINVAL, "libnfs refused the settings '" + settings + "': " + context_error(ctx));
  nfs_destroy_url(url);
  if (t.version == 4) {
    // Every session needs its own NFSv4 client id: a second SETCLIENTID with
    // the same name and another verifier would make the server drop the
    // first session's open state.
    char host[256] = {};
    (void)gethostname(host, sizeof host - 1);
    const std::string name = std::string("blockway ") + host + " " + std::to_string(::getpid()) + " " +
                             std::to_string(g_session_counter.fetch_add(1) + 1);
    nfs4_set_client_name(ctx, name.c_str());
    std::random_device rd;
    char verifier[8];
    for (char& c : verifier) c = static_cast<char>(rd());
    nfs4_set_verifier(ctx, verifier);
  }
  const std::string where = "server " + t.server + (t.port ? ":" + std::to_string(*t.port) : std::string{}) +
                            " (NFSv" + std::to_string(t.version) + ")";
  std::string why;
  if (nfs_mount_async(ctx, t.server.c_str(), t.mount_path.c_str(), &SyncCall::callback, &mount) != 0)
    return fail(EIO, "cannot mount '" + t.mount_path + "' from " + where + ": " + context_error(ctx));
  if (!wait_for(ctx, mount, Clock::now() + timeout, why))
    return fail(ECONNREFUSED, "cannot mount '" + t.mount_path + "' from " + where + ": " + why);
  if (mount.status < 0)
    return fail(-mount.status, "cannot mount '" + t.mount_path + "' from " + where + ": " +
                                   (mount.message.empty() ? std::strerror(-mount.status) : mount.message));

  bool ro = read_only;
  for (;;) {
    open = SyncCall{};
    open.want_fh = true;
    if (nfs_open_async(ctx, t.file.c_str(), ro ? O_RDONLY : O_RDWR, &SyncCall::callback, &open) != 0)
      return fail(EIO, "cannot open '" + t.file + "' in '" + t.mount_path + "' on " + where + ": " +
                           context_error(ctx));
    if (!wait_for(ctx, open, Clock::now() + timeout, why))
      return fail(ECONNRESET, "cannot open '" + t.file + "' in '" + t.mount_path + "' on " + where + ": " + why);
    const int err = -open.status;
    if (open.status < 0 && !ro && (err == EACCES || err == EROFS || err == EPERM)) {
      ro = true;  // not writable for us: serve it read-only
      continue;
    }
    if (open.status < 0)
      return fail(err, "cannot open '" + t.file + "' in '" + t.mount_path + "' on " + where + ": " +
                           (open.message.empty() ? std::strerror(err) : open.message));
    break;
  }
  s.fh = open.fh;
  s.read_only = ro;

  if (!ro && t.version == 3) {
    // libnfs 4.0 sends FILE_SYNC WRITEs on a file opened O_SYNC (NFSv3 only;
    // its NFSv4 code ignores the flag): a FUA write then needs no COMMIT.
    // NFSv3 opens hold no server state, so a second one is free. Optional.
    SyncCall stable;
    stable.want_fh = true;
    if (nfs_open_async(ctx, t.file.c_str(), O_RDWR | O_SYNC, &SyncCall::callback, &stable) == 0) {
      if (!wait_for(ctx, stable, Clock::now() + timeout, why))
        return fail(ECONNRESET, "cannot open '" + t.file + "' on " + where + ": " + why);
      if (stable.status == 0) s.fh_stable = stable.fh;
    }
  }

  stat.want_stat = true;
  if (nfs_fstat64_async(ctx, s.fh, &SyncCall::callback, &stat) != 0 ||
      !wait_for(ctx, stat, Clock::now() + timeout, why) || stat.status < 0) {
    if (why.empty()) why = stat.message.empty() ? context_error(ctx) : stat.message;
    return fail(stat.status < 0 ? -stat.status : ECONNRESET,
                "cannot get the attributes of '" + t.file + "' on " + where + ": " + why);
  }
  if (!S_ISREG(stat.st.nfs_mode))
    return fail(EINVAL, "'" + (t.mount_path == "/" ? std::string{} : t.mount_path) + t.file + "' on " + where +
                            " is not a regular file");
  s.size = stat.st.nfs_size;
  s.read_max = nfs_get_readmax(ctx);
  s.write_max = nfs_get_writemax(ctx);
  return s;
}

}  // namespace

// One operation handed to libnfs as one or more RPCs ("parts", issued back
// to back, so a transfer larger than the server's rsize/wsize is pipelined).
// Owned by its Connection's in-flight list; libnfs holds pointers to its
// parts until their callbacks ran or the context is destroyed.
struct NfsDevice::Request {
  struct Part {
    Request* request = nullptr;
    uint64_t offset = 0;
    size_t length = 0;
    std::byte* read_into = nullptr;        // reads: where the data goes (null: discard)
    const std::byte* write_from = nullptr;  // writes
    size_t done = 0;                        // bytes the server read or wrote
  };
  Connection* conn = nullptr;
  std::list<Request>::iterator pos;
  bool done = false;  // handler already posted (or abandoned with the context)
  Clock::time_point started;
  boost::asio::any_io_executor executor;  // the awaiting coroutine's
  Handler handler;
  std::vector<Part> parts;  // never resized after the first RPC is queued
  size_t pending = 0;       // RPCs queued and not answered
  int error = 0;            // first error of a part
  size_t* transferred = nullptr;  // reads and writes: bytes done from the start, in the awaiting frame
};

// What one submit() asks for.
struct NfsOp {
  enum Kind : uint8_t { read, write, stable_write, commit } kind = read;
  uint64_t offset = 0;
  size_t length = 0;
  size_t chunk = 0;  // largest RPC payload
  std::byte* read_into = nullptr;
  const std::byte* write_from = nullptr;
  size_t* transferred = nullptr;
};

class NfsDevice::Connection final : public FdWatcher::Client,
                                    public std::enable_shared_from_this<Connection> {
 public:
  Connection(boost::asio::io_context& ctx, std::chrono::milliseconds io_timeout,
             std::chrono::milliseconds keepalive, uint64_t inflight_bytes, std::string name)
      : ctx_(ctx),
        io_timeout_(io_timeout),
        keepalive_interval_(keepalive),
        name_(std::move(name)),
        timer_(ctx),
        keepalive_(ctx),
        log_(core::logger("nfs")),
        slots_(ctx.get_executor(), inflight_bytes) {}

  // Bounds the data this session has in flight (on its loop only).
  [[nodiscard]] CommandSlots& slots() noexcept { return slots_; }

  ~Connection() override {
    if (watcher_) watcher_->detach();
    kill(ENOTCONN, "closed");
  }

  [[nodiscard]] boost::asio::io_context::executor_type executor() { return ctx_.get_executor(); }
  [[nodiscard]] bool on_this_thread() const noexcept { return ctx_.get_executor().running_in_this_thread(); }
  [[nodiscard]] bool alive() const noexcept { return alive_.load(std::memory_order_acquire); }

  // On the loop thread (or before the loops run): replaces the session,
  // failing whatever was in flight on the old one.
  void install(Session session) {
    kill(ENOTCONN, "replaced by a new session");
    if (!watcher_) watcher_ = FdWatcher::create(ctx_.get_executor(), weak_from_this());
    session_ = std::move(session);
    lost_ = false;
    last_issue_ = Clock::now();
    alive_.store(true, std::memory_order_release);
    arm_keepalive();
  }

  // Fails every request in flight with `err` and destroys the session.
  void kill(int err, const std::string& why) {
    if (!session_.ctx) return;
    alive_.store(false, std::memory_order_release);
    if (!inflight_.empty() || err != ENOTCONN)
      log_->warn("{}: session closed: {} ({} requests in flight fail with {})", name_, why, inflight_.size(),
                 std::strerror(err));
    // libnfs may call back for these while the context is destroyed: they
    // are marked done first and freed only afterwards.
    std::list<Request> abandoned;
    abandoned.splice(abandoned.end(), inflight_);
    for (auto& r : abandoned) post_result(r, err);
    if (watcher_) watcher_->stop();  // before libnfs closes the fd
    session_.release();
    abandoned.clear();
    timer_.cancel();
  }

  // Stops the keepalive for good (close()).
  void stop_keepalive() {
    keepalive_stopped_ = true;
    keepalive_.cancel();
  }

  // Issues `op` as one or more RPCs.
  template <class H>
  void start(H handler, const NfsOp& op) {
    boost::asio::any_io_executor ex = boost::asio::get_associated_executor(handler, ctx_.get_executor());
    if (!session_.ctx || !alive()) {
      boost::asio::post(ex, [h = std::move(handler)]() mutable { std::move(h)(errno_code(ENOTCONN)); });
      return;
    }
    Request& r = inflight_.emplace_back();
    r.pos = std::prev(inflight_.end());
    r.conn = this;
    r.executor = std::move(ex);
    r.handler = std::make_unique<CompletionOf<H>>(std::move(handler));
    r.started = Clock::now();
    r.transferred = op.transferred;
    last_issue_ = r.started;
    if (inflight_.size() == 1) arm_timer();
    if (op.kind == NfsOp::commit) {
      r.parts.push_back({&r});
    } else {
      const size_t chunk = std::max<size_t>(op.chunk, 1);
      r.parts.reserve((op.length + chunk - 1) / chunk);
      for (size_t at = 0; at < op.length; at += chunk) {
        Request::Part part{&r, op.offset + at, std::min(chunk, op.length - at)};
        if (op.read_into != nullptr) part.read_into = op.read_into + at;
        if (op.write_from != nullptr) part.write_from = op.write_from + at;
        r.parts.push_back(part);
      }
    }
    nfs_context* ctx = session_.ctx.get();
    nfsfh* fh = session_.fh;
    for (auto& part : r.parts) {
      int rc = 0;
      switch (op.kind) {
        case NfsOp::read:
          rc = nfs_pread_async(ctx, fh, part.offset, part.length, &Connection::on_reply, &part);
          break;
        case NfsOp::write:
          rc = nfs_pwrite_async(ctx, fh, part.offset, part.length, part.write_from, &Connection::on_reply, &part);
          break;
        case NfsOp::stable_write:
          rc = nfs_pwrite_async(ctx, session_.fh_stable, part.offset, part.length, part.write_from,
                                &Connection::on_reply, &part);
          break;
        case NfsOp::commit:
          rc = nfs_fsync_async(ctx, fh, &Connection::on_reply, &part);
          break;
      }
      if (rc != 0) {
        // libnfs could not build the RPC (e.g. it does not fit its encode
        // buffer): this request fails, the session stays. Parts already
        // queued are waited for, since they use the caller's buffer.
        log_->error("{}: cannot queue an RPC: {}", name_, context_error(ctx));
        r.error = EIO;
        break;
      }
      ++r.pending;
    }
    if (lost_) {
      kill(ECONNRESET, lost_why_);
      return;
    }
    if (r.pending == 0) {
      finish(r, r.error);
      return;
    }
    watcher_->kick_soon();  // the batch queued in this turn leaves together
  }

  // FdWatcher::Client
  int watched_fd() override { return session_.ctx ? nfs_get_fd(session_.ctx.get()) : -1; }
  short wanted_events() override {
    if (!session_.ctx || inflight_.empty()) return 0;  // idle: leave nothing pending
    return static_cast<short>(nfs_which_events(session_.ctx.get()) & (POLLIN | POLLOUT));
  }
  void service(short revents) override {
    if (!session_.ctx) return;
    if (nfs_service(session_.ctx.get(), revents) < 0) {
      const char* m = nfs_get_error(session_.ctx.get());
      kill(ECONNRESET, m != nullptr && *m != '\0' ? m : "connection to the server lost");
      return;
    }
    if (lost_) kill(ECONNRESET, lost_why_);
  }

  static void on_reply(int status, nfs_context* /*nfs*/, void* data, void* priv) {
    auto* part = static_cast<Request::Part*>(priv);
    Request& r = *part->request;
    if (r.done) return;  // abandoned while the context is torn down
    r.conn->complete(r, *part, status, data);
  }

 private:
  void complete(Request& r, Request::Part& part, int status, void* data) {
    if (status < 0 && (is_rpc_failure(-status) || lost_nfs4_state(data))) {
      // The session is broken. Not torn down here (we are inside libnfs):
      // service() or start() kills it when libnfs returns, failing this
      // request and the others with a connection error.
      if (!lost_) lost_why_ = data != nullptr ? static_cast<const char*>(data) : std::strerror(-status);
      lost_ = true;
      return;
    }
    if (status >= 0) {
      size_t n = std::min(static_cast<size_t>(status), part.length);
      if (part.read_into != nullptr && n > 0) {
        if (data != nullptr) {
          std::memcpy(part.read_into, data, n);
        } else {
          n = 0;
        }
      }
      part.done = n;
    } else {
      log_->debug("{}: RPC failed: {}", name_, data != nullptr ? static_cast<const char*>(data) : "");
      if (r.error == 0) r.error = -status;
    }
    if (--r.pending > 0) return;
    if (r.transferred != nullptr) {
      // Bytes done from the start, up to the first part the server cut short.
      size_t total = 0;
      for (const auto& p : r.parts) {
        total += p.done;
        if (p.done < p.length) break;
      }
      *r.transferred = total;
    }
    finish(r, r.error);
  }

  void post_result(Request& r, int err) {
    r.done = true;
    const std::error_code ec = err ? errno_code(err) : std::error_code{};
    boost::asio::post(r.executor, [h = std::move(r.handler), ec] { h->complete(ec); });
  }

  void finish(Request& r, int err) {
    post_result(r, err);
    inflight_.erase(r.pos);
    if (inflight_.empty()) timer_.cancel();
  }

  void arm_timer() {
    timer_.expires_at(inflight_.front().started + io_timeout_);
    timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (!ec) self->on_timer();
    });
  }

  void on_timer() {
    if (!session_.ctx || inflight_.empty()) return;
    if (Clock::now() >= inflight_.front().started + io_timeout_) {
      kill(ETIMEDOUT, "no reply within " + std::to_string(io_timeout_.count()) + " ms");
      return;
    }
    arm_timer();
  }

  void arm_keepalive() {
    if (keepalive_interval_.count() <= 0 || keepalive_stopped_ || keepalive_armed_) return;
    keepalive_armed_ = true;
    keepalive_.expires_after(keepalive_interval_);
    keepalive_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      self->keepalive_armed_ = false;
      if (!ec) self->on_keepalive();
    });
  }

  void on_keepalive() {
    if (keepalive_stopped_) return;
    if (alive() && inflight_.empty() && Clock::now() - last_issue_ >= keepalive_interval_ &&
        session_.size > 0) {
      // A one-byte READ with the open stateid renews the NFSv4 lease.
      NfsOp op;
      op.kind = NfsOp::read;
      op.length = 1;
      op.chunk = 1;
      start([](std::error_code) {}, op);
    }
    arm_keepalive();
  }

  Session session_;
  boost::asio::io_context& ctx_;
  std::chrono::milliseconds io_timeout_;
  std::chrono::milliseconds keepalive_interval_;
  std::string name_;
  boost::asio::steady_timer timer_;
  boost::asio::steady_timer keepalive_;
  std::shared_ptr<spdlog::logger> log_;
  CommandSlots slots_;
  std::shared_ptr<FdWatcher> watcher_;
  std::list<Request> inflight_;  // in issue order: the front is the oldest
  std::atomic<bool> alive_{false};
  bool lost_ = false;
  std::string lost_why_;
  Clock::time_point last_issue_{};
  bool keepalive_stopped_ = false;
  bool keepalive_armed_ = false;
};

namespace {

Task<void> install_on(std::shared_ptr<NfsDevice::Connection> conn, NfsDevice::Session session) {
  conn->install(std::move(session));
  co_return;
}

Task<void> stop_keepalive_on(std::shared_ptr<NfsDevice::Connection> conn) {
  conn->stop_keepalive();
  co_return;
}

uint32_t clamp_transfer(uint64_t server_max) {
  if (server_max == 0) return 1u << 20;  // libnfs always knows; be safe anyway
  return static_cast<uint32_t>(std::min<uint64_t>(server_max, kMaxTransfer));
}

}  // namespace

NfsDevice::NfsDevice(std::string uri, NfsTarget target, bool read_only, NfsOptions options,
                     core::EventLoops& loops)
    : uri_(std::move(uri)), target_(std::move(target)), options_(options), loops_(loops) {
  auto first = connect_session(target_, read_only, options_.io_timeout);
  if (!first.ctx) throw BackendError("NFS URI '" + uri_ + "': " + first.message);
  geometry_.size = first.size;
  geometry_.min_block = 1;
  geometry_.preferred_block = 4096;
  read_max_ = clamp_transfer(first.read_max);
  write_max_ = clamp_transfer(first.write_max);
  // libnfs 4.0 encodes an NFSv4 COMPOUND into a fixed 4 KiB buffer (no
  // size hint before libnfs 5), so a v4 WRITE carries less than 4 KiB of
  // data; larger writes are sent as several pipelined RPCs.
  if (target_.version == 4) write_max_ = std::min<uint32_t>(write_max_, kNfs4WriteMax);
  // Larger requests are split here and pipelined; this is only a hint.
  geometry_.max_transfer = static_cast<uint32_t>(kMaxTransfer);
  caps_.read_only = first.read_only;
  stable_writes_ = first.fh_stable != nullptr;
  caps_.flush = Support::native;
  caps_.fua = Support::native;
  caps_.trim = Support::none;
  caps_.zero = Support::emulate;
  caps_.extents = Support::none;
  caps_.prefetch = Support::none;
  caps_.multi_conn = true;  // COMMIT is per file on the server
  if (target_.version != 4) options_.keepalive = std::chrono::milliseconds(0);

  const size_t count = options_.connections == 0 ? loops_.size() : options_.connections;
  std::vector<Session> sessions;
  sessions.push_back(std::move(first));
  while (sessions.size() < count) {
    auto more = connect_session(target_, caps_.read_only, options_.io_timeout);
    if (!more.ctx)
      throw BackendError("NFS URI '" + uri_ + "': session " + std::to_string(sessions.size() + 1) + ": " +
                         more.message);
    sessions.push_back(std::move(more));
  }
  for (size_t i = 0; i < sessions.size(); ++i) {
    auto conn = std::make_shared<Connection>(loops_.at(i % loops_.size()), options_.io_timeout,
                                             options_.keepalive, options_.inflight_bytes,
                                             uri_ + " #" + std::to_string(i + 1));
    conn->install(std::move(sessions[i]));  // the loops do not run yet
    conns_.push_back(std::move(conn));
  }
  core::logger("nfs")->info("{}: {} bytes, NFSv{}, {} session(s), rsize {} wsize {}{}", uri_, geometry_.size,
                               target_.version, conns_.size(), read_max_, write_max_,
                               caps_.read_only ? ", read-only" : "");
}

NfsDevice::~NfsDevice() {
  for (auto& c : conns_) c->kill(ENOTCONN, "device closed");
}

bool NfsDevice::connected() const noexcept {
  return std::all_of(conns_.begin(), conns_.end(), [](const auto& c) { return c->alive(); });
}

Task<std::error_code> NfsDevice::submit_on(Connection& conn, NfsOp op) {
  if (!conn.on_this_thread()) {
    co_return co_await boost::asio::co_spawn(conn.executor(), submit_on(conn, op), boost::asio::use_awaitable);
  }
  const uint64_t data_bytes = op.kind == NfsOp::commit ? 0 : op.length;
  if (!conn.slots().try_acquire(data_bytes)) co_await conn.slots().acquire(data_bytes);
  std::error_code ec;
  try {
    ec = co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
        [&conn](auto handler, NfsOp o) { conn.start(std::move(handler), o); }, boost::asio::use_awaitable, op);
  } catch (...) {  // no memory: give the share back, or the connection's queue stalls for good
    conn.slots().release(data_bytes);
    throw;
  }
  conn.slots().release(data_bytes);
  co_return ec;
}

// Not a coroutine: hands back submit_on's awaitable (which copies `op` into
// its own frame), saving a frame allocation per command.
Task<std::error_code> NfsDevice::submit(NfsOp op) {
  for (auto& c : conns_)
    if (c->on_this_thread()) return submit_on(*c, op);
  auto& conn = *conns_[next_.fetch_add(1, std::memory_order_relaxed) % conns_.size()];
  return submit_on(conn, op);
}

Task<std::error_code> NfsDevice::read(std::span<std::byte> buf, uint64_t offset, IoFlags /*flags*/) {
  while (!buf.empty()) {
    size_t got = 0;
    NfsOp op;
    op.kind = NfsOp::read;
    op.offset = offset;
    op.length = buf.size();
    op.chunk = read_max_;
    op.read_into = buf.data();
    op.transferred = &got;
    auto ec = co_await submit(op);
    if (ec) co_return ec;
    if (got == 0) co_return errno_code(EIO);  // the file shrank under us
    buf = buf.subspan(got);
    offset += got;
  }
  co_return std::error_code{};
}

Task<std::error_code> NfsDevice::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  if (caps_.read_only) co_return errno_code(EPERM);
  // A FUA write that fits one WRITE goes out FILE_SYNC where the session
  // can (one round trip); a larger one is written UNSTABLE and committed
  // once, rather than making the server sync every part.
  const bool stable = (flags & core::kFua) && stable_writes_ && buf.size() <= write_max_;
  while (!buf.empty()) {
    size_t done = 0;
    NfsOp op;
    op.kind = stable ? NfsOp::stable_write : NfsOp::write;
    op.offset = offset;
    op.length = buf.size();
    op.chunk = write_max_;
    op.write_from = buf.data();
    op.transferred = &done;
    auto ec = co_await submit(op);
    if (ec) co_return ec;
    if (done == 0) co_return errno_code(EIO);
    buf = buf.subspan(done);
    offset += done;
  }
  if ((flags & core::kFua) && !stable) co_return co_await commit();
  co_return std::error_code{};
}

Task<std::error_code> NfsDevice::commit() {
  NfsOp op;
  op.kind = NfsOp::commit;
  co_return co_await submit(op);
}

Task<std::error_code> NfsDevice::flush() {
  if (caps_.read_only) co_return std::error_code{};
  co_return co_await commit();
}

Task<std::error_code> NfsDevice::trim(ByteRange, IoFlags) { co_return errno_code(EOPNOTSUPP); }

Task<std::error_code> NfsDevice::zero(ByteRange, IoFlags) { co_return errno_code(EOPNOTSUPP); }

Task<std::error_code> NfsDevice::block_status(ByteRange, ExtentList&) { co_return errno_code(EOPNOTSUPP); }

Task<std::error_code> NfsDevice::prefetch(ByteRange) { co_return std::error_code{}; }

Task<void> NfsDevice::close() {
  for (auto& c : conns_) {
    auto task = stop_keepalive_on(c);  // outside the co_await (GCC 12)
    co_await boost::asio::co_spawn(c->executor(), std::move(task), boost::asio::use_awaitable);
  }
}

Task<std::error_code> NfsDevice::reconnect() {
  auto log = core::logger("nfs");
  std::vector<Session> fresh;
  const bool ro = caps_.read_only;
  for (size_t i = 0; i < conns_.size(); ++i) {
    // Only trivially destructible captures in a co_await expression (GCC 12).
    auto connect = [this, ro] { return std::make_shared<Session>(connect_session(target_, ro, options_.io_timeout)); };
    auto res = co_await core::offload(loops_.blocking(), connect);
    if (!res->ctx) {
      log->debug("{}: reconnect failed: {}", uri_, res->message);
      co_return errno_code(core::is_connection_error(errno_code(res->err)) ? res->err : ECONNREFUSED);
    }
    if (res->size != geometry_.size) {
      log->error("{}: after reconnecting the file has {} bytes instead of {}; not using it", uri_, res->size,
                 geometry_.size);
      co_return errno_code(EIO);
    }
    if (res->read_only != ro || (res->fh_stable != nullptr) != stable_writes_) {
      log->error("{}: after reconnecting the file is no longer writable; not using it", uri_);
      co_return errno_code(EIO);
    }
    fresh.push_back(std::move(*res));
  }
  for (size_t i = 0; i < conns_.size(); ++i) {
    auto task = install_on(conns_[i], std::move(fresh[i]));  // outside the co_await (GCC 12)
    co_await boost::asio::co_spawn(conns_[i]->executor(), std::move(task), boost::asio::use_awaitable);
  }
  const uint64_t gen = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;
  log->info("{}: reconnected ({} session(s), generation {})", uri_, conns_.size(), gen);
  co_return std::error_code{};
}

}  // namespace blockway::remote
