#include "remote/nfs/nfs_device.hpp"

#include "core/logging.hpp"
#include "remote/backend.hpp"
#include "remote/common/inflight_requests.hpp"
#include "remote/common/poll_until.hpp"

#include <boost/asio/async_result.hpp>
#include <boost/asio/steady_timer.hpp>

#include <fcntl.h>
#include <nfsc/libnfs.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <string_view>
#include <utility>

// Exported by libnfs 4.0 but missing from its public header: frees an open
// file's handle without an RPC, for sessions whose connection is already gone.
extern "C" void nfs_free_nfsfh(struct nfsfh* nfsfh);

// libnfs 4.0's nfs_destroy_context() does not free the NFSv4 client name
// that nfs4_set_client_name() strdup()s (fixed in later libnfs): a few bytes
// per session. LeakSanitizer reads this hook in sanitizer builds; it is
// unused otherwise.
extern "C" const char* __lsan_default_suppressions() { return "leak:nfs4_set_client_name\n"; }

namespace blockway::remote::nfs {

using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;
using Clock = std::chrono::steady_clock;

namespace {

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

// One step of the blocking set-up (mount, open, GETATTR), driven by
// common::poll_until with a deadline.
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

// A mounted export with the image open: made on a blocking thread, then
// installed in a session on its loop.
struct NfsDevice::MountedFile {
  ContextPtr ctx;
  nfsfh* fh = nullptr;
  nfsfh* fh_stable = nullptr;  // NFSv3: opened O_SYNC, its WRITEs are FILE_SYNC (for FUA)
  uint64_t size = 0;
  bool read_only = false;
  uint64_t read_max = 0;
  uint64_t write_max = 0;

  MountedFile() = default;
  MountedFile(MountedFile&& o) noexcept { *this = std::move(o); }
  MountedFile& operator=(MountedFile&& o) noexcept {
    if (this == &o) return *this;
    release();
    ctx = std::move(o.ctx);
    fh = std::exchange(o.fh, nullptr);
    fh_stable = std::exchange(o.fh_stable, nullptr);
    size = o.size;
    read_only = o.read_only;
    read_max = o.read_max;
    write_max = o.write_max;
    return *this;
  }
  MountedFile(const MountedFile&) = delete;
  MountedFile& operator=(const MountedFile&) = delete;
  ~MountedFile() { release(); }
  [[nodiscard]] explicit operator bool() const noexcept { return static_cast<bool>(ctx); }
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

using Connected = common::Connected<NfsDevice::MountedFile>;

std::atomic<uint64_t> g_session_counter{0};

// One SyncCall for common::poll_until.
struct SyncStep {
  nfs_context* ctx;
  SyncCall& call;
  bool done() { return call.done; }
  int fd() { return nfs_get_fd(ctx); }
  short events() { return static_cast<short>(nfs_which_events(ctx)); }
  bool service(short revents) { return nfs_service(ctx, revents) >= 0; }
};

// Waits until `call` completed, the deadline passed or the connection
// failed; false (with `why`) unless it completed.
bool wait_for(nfs_context* ctx, SyncCall& call, Clock::time_point deadline, std::string& why) {
  SyncStep step{ctx, call};
  switch (common::poll_until(step, deadline, std::chrono::milliseconds(200))) {
    case common::PollEnd::done:
      return true;
    case common::PollEnd::timed_out:
      why = "no answer from the server in time";
      return false;
    case common::PollEnd::cancelled:
      why = "abandoned";
      return false;
    case common::PollEnd::failed:
      break;
  }
  why = "the connection failed (" + (call.done && !call.message.empty() ? call.message : context_error(ctx)) +
        "; is an NFS server listening there?)";
  return false;
}

// Mounts the export and opens and measures the image, each step bounded by
// `timeout`. Blocking: call at start-up or on the blocking pool.
Connected connect_session(const NfsTarget& t, bool read_only, std::chrono::milliseconds timeout) {
  Connected r;
  NfsDevice::MountedFile& s = r.handle;
  // The calls' results live outside the context, which is destroyed first on
  // failure (libnfs may still call back while it is torn down).
  SyncCall mount, open, stat;
  auto fail = [&r](int err, std::string message) {
    r.handle.release();
    r.err = err;
    r.message = std::move(message);
    return std::move(r);
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
  return r;
}

}  // namespace

// One operation handed to libnfs as one or more RPCs ("parts", issued back
// to back, so a transfer larger than the server's rsize/wsize is pipelined).
// Owned by its session from start() to finish() (or kill()); libnfs holds
// pointers to its parts until their callbacks ran or the context is destroyed.
struct NfsDevice::Request : common::SessionRequest {
  struct Part {
    Request* request = nullptr;
    uint64_t offset = 0;
    size_t length = 0;
    std::byte* read_into = nullptr;        // reads: where the data goes (null: discard)
    const std::byte* write_from = nullptr;  // writes
    size_t done = 0;                        // bytes the server read or wrote
  };
  Session* session = nullptr;
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

// One session: its libnfs context with the image open, only ever touched on
// the session's loop.
class NfsDevice::Session final : public common::LoopSession {
 public:
  Session(boost::asio::io_context& io, std::chrono::milliseconds io_timeout, std::chrono::milliseconds keepalive,
          uint64_t inflight_bytes, std::string name)
      : LoopSession(io, std::move(name), "nfs"),
        keepalive_interval_(keepalive),
        keepalive_(io),
        slots_(io.get_executor(), inflight_bytes),
        inflight_(io, io_timeout, [this] { on_hung(); }) {}

  ~Session() override { kill(ENOTCONN, "closed"); }

  // Bounds the data this session has in flight (on its loop only).
  [[nodiscard]] common::CommandSlots& slots() noexcept { return slots_; }

  // On the loop thread (or before the loops run): replaces the mounted file,
  // failing whatever was in flight on the old one.
  void install(MountedFile file) {
    kill(ENOTCONN, "replaced by a new session");
    file_ = std::move(file);
    lost_ = false;
    last_issue_ = Clock::now();
    mark_up();
    arm_keepalive();
  }

  // Fails every request in flight with `err` and destroys the context.
  void kill(int err, const std::string& why) {
    if (!file_) return;
    mark_down(err, why, inflight_.size());
    // libnfs may call back for these while the context is destroyed: they
    // are marked done first and freed only afterwards.
    std::vector<std::unique_ptr<Request>> abandoned;
    abandoned.reserve(inflight_.size());
    while (!inflight_.empty()) {
      Request* r = inflight_.oldest();
      inflight_.unlink(r);
      r->complete(err);
      abandoned.emplace_back(r);
    }
    stop_watching();  // before libnfs closes the fd
    file_.release();
    abandoned.clear();
    inflight_.stop_timer();
  }

  // Stops the keepalive for good (close()).
  void stop_keepalive() {
    keepalive_stopped_ = true;
    keepalive_.cancel();
  }

  // Issues `op` as one or more RPCs.
  template <class H>
  void start(H handler, const NfsOp& op) {
    auto owned = new_request<Request>(std::move(handler), static_cast<bool>(file_));
    if (!owned) return;
    Request& r = *owned;
    r.session = this;
    r.transferred = op.transferred;
    last_issue_ = r.started;
    inflight_.link(&r, shared_from_this());
    (void)owned.release();  // finish() or kill() deletes it
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
    nfs_context* ctx = file_.ctx.get();
    nfsfh* fh = file_.fh;
    for (auto& part : r.parts) {
      int rc = 0;
      switch (op.kind) {
        case NfsOp::read:
          rc = nfs_pread_async(ctx, fh, part.offset, part.length, &Session::on_reply, &part);
          break;
        case NfsOp::write:
          rc = nfs_pwrite_async(ctx, fh, part.offset, part.length, part.write_from, &Session::on_reply, &part);
          break;
        case NfsOp::stable_write:
          rc = nfs_pwrite_async(ctx, file_.fh_stable, part.offset, part.length, part.write_from, &Session::on_reply,
                                &part);
          break;
        case NfsOp::commit:
          rc = nfs_fsync_async(ctx, fh, &Session::on_reply, &part);
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
    kick_soon();  // the batch queued in this turn leaves together
  }

  // FdWatcher::Client
  int watched_fd() override { return file_ ? nfs_get_fd(file_.ctx.get()) : -1; }
  short wanted_events() override {
    if (!file_ || inflight_.empty()) return 0;  // idle: leave nothing pending
    return static_cast<short>(nfs_which_events(file_.ctx.get()) & (POLLIN | POLLOUT));
  }
  void service(short revents) override {
    if (!file_) return;
    if (nfs_service(file_.ctx.get(), revents) < 0) {
      const char* m = nfs_get_error(file_.ctx.get());
      kill(ECONNRESET, m != nullptr && *m != '\0' ? m : "connection to the server lost");
      return;
    }
    if (lost_) kill(ECONNRESET, lost_why_);
  }

  static void on_reply(int status, nfs_context* /*nfs*/, void* data, void* priv) {
    auto* part = static_cast<Request::Part*>(priv);
    Request& r = *part->request;
    if (r.done) return;  // abandoned while the context is torn down
    r.session->part_done(r, *part, status, data);
  }

 private:
  void part_done(Request& r, Request::Part& part, int status, void* data) {
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

  void finish(Request& r, int err) {
    inflight_.unlink(&r);
    r.complete(err);  // posted: never resume the coroutine inside libnfs
    std::unique_ptr<Request> gone(&r);
  }

  // The oldest request has waited io-timeout: the session hangs.
  void on_hung() {
    if (!file_) return;
    kill(ETIMEDOUT, "no reply within " + std::to_string(inflight_.timeout().count()) + " ms");
  }

  void arm_keepalive() {
    if (keepalive_interval_.count() <= 0 || keepalive_stopped_ || keepalive_armed_) return;
    keepalive_armed_ = true;
    keepalive_.expires_after(keepalive_interval_);
    keepalive_.async_wait([self = self<Session>()](const boost::system::error_code& ec) {
      self->keepalive_armed_ = false;
      if (!ec) self->on_keepalive();
    });
  }

  void on_keepalive() {
    if (keepalive_stopped_) return;
    if (alive() && inflight_.empty() && Clock::now() - last_issue_ >= keepalive_interval_ && file_.size > 0) {
      // A one-byte READ with the open stateid renews the NFSv4 lease.
      NfsOp op;
      op.kind = NfsOp::read;
      op.length = 1;
      op.chunk = 1;
      start([](std::error_code) {}, op);
    }
    arm_keepalive();
  }

  MountedFile file_;
  std::chrono::milliseconds keepalive_interval_;
  boost::asio::steady_timer keepalive_;
  common::CommandSlots slots_;
  common::InflightRequests<Request> inflight_;
  bool lost_ = false;
  std::string lost_why_;
  Clock::time_point last_issue_{};
  bool keepalive_stopped_ = false;
  bool keepalive_armed_ = false;
};

namespace {

uint32_t clamp_transfer(uint64_t server_max) {
  if (server_max == 0) return 1u << 20;  // libnfs always knows; be safe anyway
  return static_cast<uint32_t>(std::min<uint64_t>(server_max, core::kDefaultMaxTransfer));
}

}  // namespace

NfsDevice::NfsDevice(std::string uri, NfsTarget target, bool read_only, NfsOptions options,
                     core::EventLoops& loops)
    : uri_(std::move(uri)), target_(std::move(target)), options_(options), loops_(loops) {
  auto first = connect_session(target_, read_only, options_.io_timeout);
  if (!first) throw BackendError("NFS URI '" + uri_ + "': " + first.message);
  const MountedFile& file = first.handle;
  geometry_.size = file.size;
  geometry_.min_block = 1;
  geometry_.preferred_block = 4096;
  read_max_ = clamp_transfer(file.read_max);
  write_max_ = clamp_transfer(file.write_max);
  // libnfs 4.0 encodes an NFSv4 COMPOUND into a fixed 4 KiB buffer (no
  // size hint before libnfs 5), so a v4 WRITE carries less than 4 KiB of
  // data; larger writes are sent as several pipelined RPCs.
  if (target_.version == 4) write_max_ = std::min<uint32_t>(write_max_, kNfs4WriteMax);
  // Larger requests are split here and pipelined; this is only a hint.
  geometry_.max_transfer = core::kDefaultMaxTransfer;
  caps_.read_only = file.read_only;
  stable_writes_ = file.fh_stable != nullptr;
  caps_.flush = Support::native;
  caps_.fua = Support::native;
  caps_.trim = Support::none;
  caps_.zero = Support::emulate;
  caps_.extents = Support::none;
  caps_.prefetch = Support::none;
  caps_.multi_conn = true;  // COMMIT is per file on the server
  if (target_.version != 4) options_.keepalive = std::chrono::milliseconds(0);

  const size_t count = options_.connections == 0 ? loops_.size() : options_.connections;
  auto files = common::connect_all(
      std::move(first.handle), count,
      [this](size_t) { return connect_session(target_, caps_.read_only, options_.io_timeout); },
      [this](size_t i, const std::string& message) {
        return BackendError("NFS URI '" + uri_ + "': session " + std::to_string(i + 1) + ": " + message);
      });
  sessions_.open(std::move(files), loops_, uri_, [this](boost::asio::io_context& io, std::string name) {
    return std::make_shared<Session>(io, options_.io_timeout, options_.keepalive, options_.inflight_bytes,
                                     std::move(name));
  });
  core::logger("nfs")->info("{}: {} bytes, NFSv{}, {} session(s), rsize {} wsize {}{}", uri_, geometry_.size,
                               target_.version, sessions_.size(), read_max_, write_max_,
                               caps_.read_only ? ", read-only" : "");
}

NfsDevice::~NfsDevice() { sessions_.kill_all(ENOTCONN, "device closed"); }

bool NfsDevice::connected() const noexcept { return sessions_.all_alive(); }

Task<std::error_code> NfsDevice::submit_on(Session& s, NfsOp op) {
  if (!s.on_this_thread()) co_return co_await common::on_loop_of(s, submit_on(s, op));
  const uint64_t data_bytes = op.kind == NfsOp::commit ? 0 : op.length;
  if (!s.slots().try_acquire(data_bytes)) co_await s.slots().acquire(data_bytes);
  std::error_code ec;
  try {
    ec = co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
        [&s](auto handler, NfsOp o) { s.start(std::move(handler), o); }, boost::asio::use_awaitable, op);
  } catch (...) {  // no memory: give the share back, or the session's queue stalls for good
    s.slots().release(data_bytes);
    throw;
  }
  s.slots().release(data_bytes);
  co_return ec;
}

// Not a coroutine: hands back submit_on's awaitable (which copies `op` into
// its own frame), saving a frame allocation per command.
Task<std::error_code> NfsDevice::submit(NfsOp op) { return submit_on(sessions_.pick(), op); }

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

Task<void> NfsDevice::close() {
  co_await sessions_.on_each([](Session& s) { s.stop_keepalive(); });
}

Task<std::error_code> NfsDevice::reconnect() {
  auto log = core::logger("nfs");
  std::vector<MountedFile> fresh;
  const bool ro = caps_.read_only;
  for (size_t i = 0; i < sessions_.size(); ++i) {
    // Only trivially destructible captures in a co_await expression (GCC 12).
    auto connect = [this, ro] {
      return std::make_shared<Connected>(connect_session(target_, ro, options_.io_timeout));
    };
    auto res = co_await core::offload(loops_.blocking(), connect);
    if (!*res) {
      log->debug("{}: reconnect failed: {}", uri_, res->message);
      co_return common::reconnect_failure(res->err);
    }
    const MountedFile& file = res->handle;
    if (file.size != geometry_.size) {
      log->error("{}: after reconnecting the file has {} bytes instead of {}; not using it", uri_, file.size,
                 geometry_.size);
      co_return errno_code(EIO);
    }
    if (file.read_only != ro || (file.fh_stable != nullptr) != stable_writes_) {
      log->error("{}: after reconnecting the file is no longer writable; not using it", uri_);
      co_return errno_code(EIO);
    }
    fresh.push_back(std::move(res->handle));
  }
  for (size_t i = 0; i < sessions_.size(); ++i) co_await sessions_.install(i, std::move(fresh[i]));
  const uint64_t gen = sessions_.next_generation();
  log->info("{}: reconnected ({} session(s), generation {})", uri_, sessions_.size(), gen);
  co_return std::error_code{};
}

}  // namespace blockway::remote::nfs
