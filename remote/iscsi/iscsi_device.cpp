#include "remote/iscsi/iscsi_device.hpp"

#include "core/logging.hpp"
#include "remote/backend.hpp"
#include "remote/common/inflight_requests.hpp"
#include "remote/common/poll_until.hpp"
#include "remote/iscsi/scsi_errors.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

namespace blockway::remote::iscsi {

using core::ByteRange;
using core::errno_code;
using core::ExtentList;
using core::IoFlags;
using core::Support;
using core::Task;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kMaxAttempts = 8;            // per command, for UNIT ATTENTION, BUSY and the like
constexpr uint32_t kLbaStatusAlloc = 4096;  // GET LBA STATUS answer: up to 255 descriptors
constexpr uint64_t kMaxBlocksPerCommand = 0xffffffffull;

struct ContextCloser {
  void operator()(iscsi_context* c) const noexcept { iscsi_destroy_context(c); }
};
using ContextPtr = std::unique_ptr<iscsi_context, ContextCloser>;

struct TaskFree {
  void operator()(scsi_task* t) const noexcept { scsi_free_scsi_task(t); }
};
using TaskPtr = std::unique_ptr<scsi_task, TaskFree>;

std::string context_error(iscsi_context* ctx) {
  const char* m = ctx != nullptr ? iscsi_get_error(ctx) : nullptr;
  std::string s = m != nullptr && *m != '\0' ? m : "unknown libiscsi error";
  while (!s.empty() && (s.back() == '\n' || s.back() == '.' || s.back() == ' ')) s.pop_back();
  return s;
}

// One random ISID base per process; each session slot adds its index, so
// two sessions of one daemon never reinstate each other, while a slot that
// logs in again reinstates (and so cleans up) its own old session.
uint32_t isid_base() {
  static const uint32_t base = [] {
    std::random_device rd;
    return (rd() & 0xffffffu) & ~0xffu;
  }();
  return base;
}

using Connected = common::Connected<ContextPtr>;

struct ConnectState {
  bool done = false;
  int status = 0;
  std::string error;  // libiscsi overwrites its error text right after the callback
};

void on_connected(iscsi_context* ctx, int status, void*, void* private_data) {
  auto* st = static_cast<ConnectState*>(private_data);
  st->done = true;
  st->status = status;
  if (status != SCSI_STATUS_GOOD) st->error = context_error(ctx);
}

// Turns libiscsi's words into what a user needs to act on.
std::string explain_login_failure(const IscsiUri& uri, const std::string& raw) {
  if (raw.find("Target not found") != std::string::npos || raw.find("TARGET_NOT_FOUND") != std::string::npos ||
      raw.find("target not found") != std::string::npos)
    return "target " + uri.target + " not found on " + uri.portal() + " (" + raw + ")";
  if (raw.find("uthentication") != std::string::npos || raw.find("CHAP") != std::string::npos) {
    if (uri.user.empty())
      return "login to " + uri.target + " refused: the target wants CHAP; give iscsi://user%password@" +
             uri.portal() + "/... (" + raw + ")";
    return "login to " + uri.target + " refused: CHAP authentication failed for user '" + uri.user + "' (" + raw +
           ")";
  }
  return raw;
}

// One step of the login (connect, then login) for common::poll_until.
struct LoginStep {
  iscsi_context* ctx;
  ConnectState& state;
  bool done() { return state.done; }
  int fd() { return iscsi_get_fd(ctx); }
  short events() { return static_cast<short>(iscsi_which_events(ctx)); }
  bool service(short revents) { return iscsi_service(ctx, revents) >= 0; }
};

// Drives ctx until `state` is done (true) or `deadline` passes (false).
bool run_until(iscsi_context* ctx, ConnectState& state, Clock::time_point deadline) {
  LoginStep step{ctx, state};
  const auto end = common::poll_until(step, deadline);
  if ((end == common::PollEnd::failed || end == common::PollEnd::cancelled) && !state.done) {
    // Lost before libiscsi called back (e.g. the target closed during the
    // login), or abandoned (common::CancelOpensWhen).
    state.done = true;
    state.status = SCSI_STATUS_ERROR;
    state.error = end == common::PollEnd::cancelled ? std::string("the login was abandoned") : context_error(ctx);
  }
  return end != common::PollEnd::timed_out;
}

// Connects and logs one session in, giving up after `timeout` (a portal that
// accepts but never answers must not block a thread forever). The LUN itself
// is checked by the caller's first command. Connect and login are driven
// separately rather than with iscsi_full_connect_async: that one's private
// state leaks when the context is destroyed, or the socket lost, mid-login.
// Blocking: call at start-up or on the blocking pool.
Connected connect_session(const IscsiUri& uri, const IscsiOptions& o, uint32_t slot) {
  Connected r;
  r.handle.reset(iscsi_create_context(o.initiator.c_str()));
  iscsi_context* ctx = r.handle.get();
  if (ctx == nullptr) {
    r.err = ENOMEM;
    r.message = "cannot create an iSCSI context";
    return r;
  }
  auto fail = [&r](int err, std::string message) {
    r.err = err;
    r.message = std::move(message);
    r.handle.reset();  // no callback of ours runs on destroy before login completes
    return std::move(r);
  };
  iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
  iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C);
  iscsi_set_noautoreconnect(ctx, 1);  // RetryLayer decides when and how often
  iscsi_set_isid_random(ctx, isid_base() | (slot & 0xffu), 0);
  if (iscsi_set_targetname(ctx, uri.target.c_str()) != 0 ||
      (!uri.user.empty() &&
       iscsi_set_initiator_username_pwd(ctx, uri.user.c_str(), uri.password.c_str()) != 0))
    return fail(EINVAL, context_error(ctx));
  const auto deadline = Clock::now() + o.io_timeout;
  const std::string timeout_text = std::to_string(o.io_timeout.count()) + " ms";

  ConnectState connected;
  if (iscsi_connect_async(ctx, uri.portal().c_str(), &on_connected, &connected) != 0)
    return fail(ECONNREFUSED, context_error(ctx));
  if (!run_until(ctx, connected, deadline)) return fail(ETIMEDOUT, "no TCP connection within " + timeout_text);
  if (connected.status != SCSI_STATUS_GOOD) {
    const std::string raw = connected.error.empty() ? context_error(ctx) : connected.error;
    return fail(raw.find("refused") != std::string::npos ? ECONNREFUSED : ECONNRESET, raw);
  }

  ConnectState logged_in;
  if (iscsi_login_async(ctx, &on_connected, &logged_in) != 0) return fail(ECONNRESET, context_error(ctx));
  if (!run_until(ctx, logged_in, deadline)) return fail(ETIMEDOUT, "no answer to the login within " + timeout_text);
  if (logged_in.status != SCSI_STATUS_GOOD) {
    const std::string raw = logged_in.error.empty() ? context_error(ctx) : logged_in.error;
    return fail(ECONNRESET, explain_login_failure(uri, raw));
  }
  return r;
}

// A synchronous probe command, retried over UNIT ATTENTION. Only at start-up
// and on reconnect, with libiscsi's own command timeout set.
template <class F>
TaskPtr probe_command(F issue) {
  TaskPtr t;
  for (int i = 0; i < kMaxAttempts; ++i) {
    t.reset(issue());
    if (!t || t->status != SCSI_STATUS_CHECK_CONDITION || t->sense.key != SCSI_SENSE_UNIT_ATTENTION) break;
  }
  return t;
}

std::string task_failure(iscsi_context* ctx, const TaskPtr& t) {
  if (!t) return context_error(ctx);
  return describe_scsi_status(t->status, t->sense.key, t->sense.ascq);
}

// READ CAPACITY(16), VPD 0xB0/0xB2, MODE SENSE. Throws BackendError.
IscsiLunInfo probe_lun(iscsi_context* ctx, const IscsiUri& uri) {
  IscsiLunInfo info;
  const int lun = uri.lun;
  auto cap = probe_command([&] { return iscsi_readcapacity16_sync(ctx, lun); });
  if (cap && cap->status == SCSI_STATUS_CHECK_CONDITION && cap->sense.key == SCSI_SENSE_ILLEGAL_REQUEST &&
      cap->sense.ascq == SCSI_SENSE_ASCQ_LOGICAL_UNIT_NOT_SUPPORTED)
    throw BackendError("'" + uri.redacted() + "': LUN " + std::to_string(lun) + " does not exist on target " +
                       uri.target + " (" + task_failure(ctx, cap) + ")");
  if (!cap || cap->status != SCSI_STATUS_GOOD)
    throw BackendError("'" + uri.redacted() + "': READ CAPACITY(16) failed: " + task_failure(ctx, cap));
  auto* rc16 = static_cast<scsi_readcapacity16*>(scsi_datain_unmarshall(cap.get()));
  if (rc16 == nullptr || rc16->block_length == 0 || (rc16->block_length & (rc16->block_length - 1)) != 0)
    throw BackendError("'" + uri.redacted() + "': READ CAPACITY(16) gave no usable block size");
  info.blocks = rc16->returned_lba + 1;
  info.block_size = rc16->block_length;
  info.physical_exponent = std::min<uint32_t>(rc16->lbppbe, 8);
  info.thin = rc16->lbpme != 0;
  info.unmapped_reads_zero = rc16->lbprz != 0;

  bool has_b0 = false, has_b2 = false;
  auto pages = probe_command([&] {
    return iscsi_inquiry_sync(ctx, lun, 1, SCSI_INQUIRY_PAGECODE_SUPPORTED_VPD_PAGES, 255);
  });
  if (pages && pages->status == SCSI_STATUS_GOOD) {
    if (auto* sp = static_cast<scsi_inquiry_supported_pages*>(scsi_datain_unmarshall(pages.get()))) {
      for (int i = 0; i < sp->num_pages; ++i) {
        has_b0 = has_b0 || sp->pages[i] == SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS;
        has_b2 = has_b2 || sp->pages[i] == SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING;
      }
    }
  }
  if (has_b0) {
    auto bl = probe_command([&] { return iscsi_inquiry_sync(ctx, lun, 1, SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS, 64); });
    if (bl && bl->status == SCSI_STATUS_GOOD) {
      if (auto* b = static_cast<scsi_inquiry_block_limits*>(scsi_datain_unmarshall(bl.get()))) {
        info.has_block_limits = true;
        info.max_transfer_blocks = b->max_xfer_len;
        info.optimal_transfer_blocks = b->opt_xfer_len;
        info.max_unmap_blocks = b->max_unmap;
        info.max_unmap_descriptors = b->max_unmap_bdc;
        info.max_write_same_blocks = b->max_ws_len;
      }
    }
  }
  if (has_b2 && info.thin) {
    auto lbp = probe_command([&] {
      return iscsi_inquiry_sync(ctx, lun, 1, SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING, 64);
    });
    if (lbp && lbp->status == SCSI_STATUS_GOOD) {
      if (auto* p = static_cast<scsi_inquiry_logical_block_provisioning*>(scsi_datain_unmarshall(lbp.get()))) {
        info.unmap = p->lbpu != 0;
        info.write_same_unmap = p->lbpws != 0;
      }
    }
  }
  // Device-specific parameter: 0x80 write protect, 0x10 DPO and FUA supported.
  auto ms = probe_command([&] { return iscsi_modesense6_sync(ctx, lun, 1, SCSI_MODESENSE_PC_CURRENT, 0x3f, 0, 255); });
  if (ms && ms->status == SCSI_STATUS_GOOD) {
    if (auto* m = static_cast<scsi_mode_sense*>(scsi_datain_unmarshall(ms.get()))) {
      info.write_protected = (m->device_specific_parameter & 0x80) != 0;
      info.dpofua = (m->device_specific_parameter & 0x10) != 0;
    }
  }
  return info;
}

int seconds_for_libiscsi(std::chrono::milliseconds t) {
  return static_cast<int>(std::max<int64_t>(1, (t.count() + 999) / 1000));
}

}  // namespace

// One command handed to libiscsi. Owned by libiscsi's callback from the
// *_task() call on: the callback (called exactly once, also when the session
// is cancelled) frees the task and deletes the request.
struct IscsiDevice::Request : common::SessionRequest {
  Session* session = nullptr;
  scsi_task* task = nullptr;
  scsi_iovec iov{};     // the caller's buffer, handed to libiscsi without a copy
  unmap_list unmap{};   // UNMAP's one descriptor
  // GET LBA STATUS only
  ExtentList* extents = nullptr;
  uint64_t status_lba = 0;
  uint64_t status_end = 0;  // first LBA past the asked range
  uint32_t block_size = 0;
  bool lbprz = false;
};

// One session: its iSCSI context, only ever touched on the session's loop.
class IscsiDevice::Session final : public common::LoopSession {
 public:
  Session(boost::asio::io_context& io, int lun, std::chrono::milliseconds io_timeout, uint64_t inflight_bytes,
          std::string name)
      : LoopSession(io, std::move(name), "iscsi"),
        lun_(lun),
        slots_(io.get_executor(), inflight_bytes),
        inflight_(io, io_timeout, [this] { on_hung(); }) {}

  ~Session() override { kill(ENOTCONN, "session closed"); }

  // Bounds the data this session has in flight (on its loop only).
  [[nodiscard]] common::CommandSlots& slots() noexcept { return slots_; }

  // On the loop thread (or before the loop runs): replaces the context,
  // failing whatever was in flight on the old one.
  void install(ContextPtr ctx) {
    kill(ENOTCONN, "replaced by a new session");
    ctx_ = std::move(ctx);
    broken_ = false;
    mark_up();
  }

  // Fails every command in flight with `err` and logs out of nothing: the
  // context is destroyed (its socket closed). Never from inside a libiscsi
  // callback.
  void kill(int err, const std::string& why) {
    if (!ctx_) return;
    mark_down(err, why, inflight_.size(), "commands");
    while (!inflight_.empty()) finish(inflight_.oldest(), err);
    stop_watching();  // before libiscsi closes the fd
    iscsi_scsi_cancel_all_tasks(ctx_.get());  // each callback frees its task and request
    ctx_.reset();
    inflight_.stop_timer();
  }

  // Issues one command. `issue(ctx, lun, request, callback)` calls an
  // iscsi_*_task() function and returns its task (or nullptr).
  template <class H, class Issue>
  void start(H handler, Issue& issue) {
    auto owned = new_request<Request>(std::move(handler), ctx_ != nullptr);
    if (!owned) return;
    Request* r = owned.get();
    r->session = this;
    r->task = issue(ctx_.get(), lun_, r, &on_command);
    if (r->task == nullptr) {
      // Not queued, no callback will come: fail it here.
      const std::string why = context_error(ctx_.get());
      log_->debug("{}: cannot queue a command: {}", name_, why);
      r->complete(ENOTCONN);
      kill(ENOTCONN, why);
      return;
    }
    inflight_.link(r, shared_from_this());
    (void)owned.release();  // the callback deletes it
    kick_soon();  // the batch queued in this turn leaves together
  }

  // FdWatcher::Client
  int watched_fd() override { return ctx_ ? iscsi_get_fd(ctx_.get()) : -1; }
  short wanted_events() override {
    if (!ctx_ || inflight_.empty()) return 0;  // idle: leave nothing pending
    return static_cast<short>(iscsi_which_events(ctx_.get()) & (POLLIN | POLLOUT));
  }
  void service(short revents) override {
    if (!ctx_) return;
    const int rc = iscsi_service(ctx_.get(), revents);
    if (rc < 0 || broken_) kill(ECONNRESET, rc < 0 ? context_error(ctx_.get()) : "target dropped the session");
  }

 private:
  static void on_command(iscsi_context*, int status, void*, void* private_data) {
    auto* r = static_cast<Request*>(private_data);
    std::unique_ptr<Request> gone(r);
    TaskPtr task(r->task);
    if (r->done) return;  // already failed by kill()
    Session* s = r->session;
    const int key = status == SCSI_STATUS_CHECK_CONDITION ? static_cast<int>(task->sense.key) : 0;
    const int ascq = status == SCSI_STATUS_CHECK_CONDITION ? task->sense.ascq : 0;
    ScsiOutcome out = scsi_outcome(status, key, ascq);
    // A WRITE SAME the LUN does not do: EOPNOTSUPP, zero()'s cue to stop
    // sending it (CheckedDevice then writes the zeroes).
    if (task->cdb[0] == SCSI_OPCODE_WRITE_SAME16 && scsi_command_refused(status, key, ascq)) out.err = EOPNOTSUPP;
    if (status == SCSI_STATUS_CANCELLED || status == SCSI_STATUS_ERROR) s->broken_ = true;
    if (out.err == 0 && r->extents != nullptr) out.err = parse_lba_status(*r, task.get());
    if (out.err != 0 && !core::is_connection_error(errno_code(out.err)))
      s->log_->debug("{}: command 0x{:02x} {}: {}", s->name_, task->cdb[0], out.retry ? "will be retried" : "failed",
                     describe_scsi_status(status, key, ascq));
    s->finish(r, out.err);
  }

  // GET LBA STATUS parameter data to base:allocation extents from r.status_lba.
  static int parse_lba_status(Request& r, scsi_task* task) {
    auto* st = static_cast<scsi_get_lba_status*>(scsi_datain_unmarshall(task));
    if (st == nullptr) return EIO;
    uint64_t cursor = r.status_lba;
    const size_t first = r.extents->size();
    for (uint32_t i = 0; i < st->num_descriptors && cursor < r.status_end; ++i) {
      const auto& d = st->descriptors[i];
      const uint64_t end = d.lba + d.num_blocks;
      if (d.lba > cursor) break;  // a gap: stop at what is known
      if (end <= cursor) continue;
      const uint64_t take = std::min(end, r.status_end) - cursor;
      uint32_t flags = 0;
      if (d.provisioning == SCSI_PROVISIONING_TYPE_DEALLOCATED) flags |= core::kExtentHole;
      if (d.provisioning != SCSI_PROVISIONING_TYPE_MAPPED && r.lbprz) flags |= core::kExtentZero;
      if (r.extents->size() > first && r.extents->back().flags == flags)
        r.extents->back().length += take * r.block_size;
      else
        r.extents->push_back({take * r.block_size, flags});
      cursor += take;
    }
    return cursor > r.status_lba ? 0 : EIO;
  }

  void finish(Request* r, int err) {
    inflight_.unlink(r);
    r->complete(err);  // posted: never resume the coroutine inside libiscsi's service call
  }

  // The oldest command has waited io-timeout: the session hangs.
  void on_hung() {
    if (!ctx_) return;
    kill(ETIMEDOUT, "no answer within " + std::to_string(inflight_.timeout().count()) + " ms");
  }

  int lun_;
  common::CommandSlots slots_;
  common::InflightRequests<Request> inflight_;
  ContextPtr ctx_;
  bool broken_ = false;  // a callback saw the session go; kill after service returns
};

namespace {

Task<void> sleep_for(std::chrono::milliseconds d) {
  const auto ex = co_await boost::asio::this_coro::executor;
  boost::asio::steady_timer timer(ex, d);
  co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

}  // namespace

IscsiDevice::IscsiDevice(IscsiUri uri, bool read_only, IscsiOptions options, core::EventLoops& loops)
    : uri_(std::move(uri)), read_only_(read_only), options_(std::move(options)), loops_(loops) {
  const std::string name = uri_.redacted();
  auto first = connect_session(uri_, options_, 0);
  if (!first) throw BackendError("cannot log in to '" + name + "': " + first.message);
  iscsi_set_timeout(first.handle.get(), seconds_for_libiscsi(options_.io_timeout));
  info_ = probe_lun(first.handle.get(), uri_);
  iscsi_set_timeout(first.handle.get(), 0);  // the data path keeps its own clock

  const uint32_t bs = info_.block_size;
  geometry_.size = info_.blocks * bs;
  geometry_.min_block = bs;
  geometry_.preferred_block = std::max<uint32_t>(4096, bs << info_.physical_exponent);
  uint64_t max_bytes = core::kDefaultMaxTransfer;
  if (info_.max_transfer_blocks > 0) max_bytes = std::min<uint64_t>(max_bytes, uint64_t{info_.max_transfer_blocks} * bs);
  geometry_.max_transfer = std::max<uint32_t>(static_cast<uint32_t>(max_bytes / bs * bs), bs);

  caps_.read_only = read_only_ || info_.write_protected;
  caps_.flush = Support::native;
  caps_.fua = info_.dpofua ? Support::native : Support::none;  // none: CheckedDevice adds a flush
  caps_.trim = info_.thin && info_.unmap && info_.max_unmap_blocks > 0 && info_.max_unmap_descriptors > 0
                   ? Support::native
                   : Support::none;
  // WRITE SAME(16): with UNMAP on a thin LUN with LBPWS; without UNMAP
  // wherever the Block Limits page is there (tgt's plain LUNs too), so
  // zeroes stop crossing the wire; zero() falls back if the LUN refuses.
  caps_.zero = (info_.thin && info_.write_same_unmap) || (info_.has_block_limits && options_.write_same)
                   ? Support::native
                   : Support::none;
  caps_.extents = info_.thin ? Support::native : Support::none;
  caps_.prefetch = Support::none;
  caps_.multi_conn = true;  // SYNCHRONIZE CACHE acts on the LUN, whichever session sends it
  zero_block_.assign(bs, 0);

  const size_t count = options_.sessions != 0 ? options_.sessions : loops_.size();
  auto contexts = common::connect_all(
      std::move(first.handle), count,
      [this](size_t i) { return connect_session(uri_, options_, static_cast<uint32_t>(i)); },
      [&name](size_t i, const std::string& message) {
        return BackendError("cannot open session " + std::to_string(i + 1) + " to '" + name + "': " + message);
      });
  sessions_.open(std::move(contexts), loops_, name, [this](boost::asio::io_context& io, std::string session_name) {
    return std::make_shared<Session>(io, uri_.lun, options_.io_timeout, options_.inflight_bytes,
                                     std::move(session_name));
  });
  core::logger("iscsi")->info(
      "{}: {} bytes, {}-byte blocks, {} session(s), max transfer {}{}{}{}{}{}", name, geometry_.size, bs,
      sessions_.size(), geometry_.max_transfer, caps_.fua == Support::native ? ", fua" : "",
      caps_.trim == Support::native ? ", unmap" : "", caps_.zero == Support::native ? ", write-same" : "",
      caps_.extents == Support::native ? ", lba-status" : "", caps_.read_only ? ", read-only" : "");
}

IscsiDevice::~IscsiDevice() { sessions_.kill_all(ENOTCONN, "device closed"); }

bool IscsiDevice::connected() const noexcept { return sessions_.all_alive(); }

std::string IscsiDevice::describe() const { return uri_.redacted(); }

template <class Issue>
Task<std::error_code> IscsiDevice::submit_once(Session& s, Issue& issue) {
  co_return co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
      [&s](auto handler, Issue* iss) { s.start(std::move(handler), *iss); }, boost::asio::use_awaitable, &issue);
}

template <class Issue>
Task<std::error_code> IscsiDevice::submit_on(Session& s, Issue issue, uint64_t data_bytes) {
  if (!s.on_this_thread()) {
    auto hop = submit_on(s, std::move(issue), data_bytes);  // outside the co_await (GCC 12)
    co_return co_await common::on_loop_of(s, std::move(hop));
  }
  // UNIT ATTENTION, BUSY and friends: the command did not run; send it again,
  // backing off a little from the third attempt on.
  for (int attempt = 1;; ++attempt) {
    if (!s.slots().try_acquire(data_bytes)) co_await s.slots().acquire(data_bytes);
    std::error_code ec;
    try {
      ec = co_await submit_once(s, issue);
    } catch (...) {  // no memory: give the share back, or the session's queue stalls for good
      s.slots().release(data_bytes);
      throw;
    }
    s.slots().release(data_bytes);
    if (ec.value() != EAGAIN || ec.category() != std::system_category()) co_return ec;
    if (attempt >= kMaxAttempts) co_return errno_code(EIO);
    if (attempt >= 2) co_await sleep_for(std::chrono::milliseconds(5 << attempt));
  }
}

// Not a coroutine: hands back submit_on's awaitable (which moves `issue` into
// its own frame), saving a frame allocation per command.
template <class Issue>
Task<std::error_code> IscsiDevice::submit(Issue issue, uint64_t data_bytes) {
  // A live session, skipping dead ones while one lives: reconnect() replaces
  // only the dead sessions, and the live ones keep serving meanwhile.
  return submit_on(sessions_.pick_live(), std::move(issue), data_bytes);
}

template <class Issue>
Task<std::error_code> IscsiDevice::submit_blocks(uint64_t lba, uint64_t blocks, uint64_t step, Issue issue) {
  while (blocks > 0) {
    const uint64_t n = std::min(blocks, step);
    auto ec = co_await submit([lba, n, issue](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb) {
      return issue(ctx, lun, r, cb, lba, n);
    });
    if (ec) co_return ec;
    lba += n;
    blocks -= n;
  }
  co_return std::error_code{};
}

Task<std::error_code> IscsiDevice::read(std::span<std::byte> buf, uint64_t offset, IoFlags /*flags*/) {
  if (buf.empty()) co_return std::error_code{};
  const uint32_t bs = info_.block_size;
  auto issue = [buf, offset, bs](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb) {
    r->iov = {buf.data(), buf.size()};
    return iscsi_read16_iov_task(ctx, lun, offset / bs, static_cast<uint32_t>(buf.size()), static_cast<int>(bs), 0, 0,
                                 0, 0, 0, cb, r, &r->iov, 1);
  };
  co_return co_await submit(issue, buf.size());
}

Task<std::error_code> IscsiDevice::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  if (caps_.read_only) co_return errno_code(EPERM);
  if (buf.empty()) co_return std::error_code{};
  const uint32_t bs = info_.block_size;
  const int fua = (flags & core::kFua) && caps_.fua == Support::native ? 1 : 0;
  auto issue = [buf, offset, bs, fua](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb) {
    // libiscsi only reads through the iovec; its API is not const-correct.
    r->iov = {const_cast<std::byte*>(buf.data()), buf.size()};
    return iscsi_write16_iov_task(ctx, lun, offset / bs, nullptr, static_cast<uint32_t>(buf.size()),
                                  static_cast<int>(bs), 0, 0, fua, 0, 0, cb, r, &r->iov, 1);
  };
  co_return co_await submit(issue, buf.size());
}

Task<std::error_code> IscsiDevice::flush() {
  auto issue = [](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb) {
    return iscsi_synchronizecache16_task(ctx, lun, 0, 0, 0, 0, cb, r);  // the whole LUN
  };
  co_return co_await submit(issue);
}

Task<std::error_code> IscsiDevice::trim(ByteRange range, IoFlags flags) {
  if (caps_.read_only) co_return errno_code(EPERM);
  if (caps_.trim != Support::native) co_return errno_code(EOPNOTSUPP);
  const uint32_t bs = info_.block_size;
  const uint64_t lba = range.offset / bs;
  const uint64_t left = range.length / bs;
  const uint64_t step = std::min<uint64_t>(info_.max_unmap_blocks, kMaxBlocksPerCommand);
  auto unmap = [](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb, uint64_t first, uint64_t n) {
    r->unmap = {first, static_cast<uint32_t>(n)};
    return iscsi_unmap_task(ctx, lun, 0, 0, &r->unmap, 1, cb, r);
  };
  if (auto ec = co_await submit_blocks(lba, left, step, unmap)) co_return ec;
  if (flags & core::kFua) co_return co_await flush();
  co_return std::error_code{};
}

Task<std::error_code> IscsiDevice::zero(ByteRange range, IoFlags flags) {
  if (caps_.read_only) co_return errno_code(EPERM);
  if (caps_.zero != Support::native) co_return errno_code(EOPNOTSUPP);
  // WRITE SAME with UNMAP only on a thin LUN that has it and where unmapped
  // blocks read as zeroes; with NO_HOLE, or on a LUN that is not thin, the
  // target writes the zeroes (allocated). That is not "fast": FAST_ZERO
  // wants the unmapping kind.
  const int unmap = info_.thin && info_.write_same_unmap && info_.unmapped_reads_zero &&
                            !unmap_refused_.load(std::memory_order_relaxed) && !(flags & core::kNoHole)
                        ? 1
                        : 0;
  if ((flags & core::kFastZero) && !unmap) co_return errno_code(EOPNOTSUPP);
  if (!unmap && (!options_.write_same || write_same_refused_.load(std::memory_order_relaxed)))
    co_return errno_code(EOPNOTSUPP);
  const uint32_t bs = info_.block_size;
  const uint64_t lba = range.offset / bs;
  const uint64_t left = range.length / bs;
  uint64_t step = info_.max_write_same_blocks != 0 ? info_.max_write_same_blocks : core::kDefaultMaxTransfer / bs;
  step = std::min(step, kMaxBlocksPerCommand);
  unsigned char* pattern = zero_block_.data();
  auto write_same = [unmap, bs, pattern](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb, uint64_t first,
                                         uint64_t n) {
    return iscsi_writesame16_task(ctx, lun, first, pattern, bs, static_cast<uint32_t>(n), 0, unmap, 0, 0, cb, r);
  };
  if (auto ec = co_await submit_blocks(lba, left, step, write_same)) {
    if (!unmap && ec == std::errc::operation_not_supported &&
        !write_same_refused_.exchange(true, std::memory_order_relaxed))
      core::logger("iscsi")->info("{}: the LUN refuses WRITE SAME(16) without UNMAP; zeroes are written instead",
                                  uri_.redacted());
    if (unmap && ec == std::errc::operation_not_supported &&
        !unmap_refused_.exchange(true, std::memory_order_relaxed))
      core::logger("iscsi")->info("{}: the LUN refuses WRITE SAME(16) with UNMAP; zeroes are written allocated instead",
                                  uri_.redacted());
    co_return ec;
  }
  if (flags & core::kFua) co_return co_await flush();
  co_return std::error_code{};
}

Task<std::error_code> IscsiDevice::block_status(ByteRange range, ExtentList& out) {
  if (caps_.extents != Support::native) co_return errno_code(EOPNOTSUPP);
  if (range.length == 0) co_return errno_code(EINVAL);
  const uint32_t bs = info_.block_size;
  const uint64_t lba = range.offset / bs;
  const uint64_t end = (range.offset + range.length + bs - 1) / bs;
  const bool lbprz = info_.unmapped_reads_zero;
  ExtentList* list = &out;
  const size_t before = out.size();
  auto issue = [lba, end, bs, lbprz, list, before](iscsi_context* ctx, int lun, Request* r, iscsi_command_cb cb) {
    list->resize(before);  // a retried attempt starts over
    r->extents = list;
    r->status_lba = lba;
    r->status_end = end;
    r->block_size = bs;
    r->lbprz = lbprz;
    return iscsi_get_lba_status_task(ctx, lun, lba, kLbaStatusAlloc, cb, r);
  };
  co_return co_await submit(issue);  // CheckedDevice passes block-aligned ranges only
}

Task<std::error_code> IscsiDevice::reconnect() {
  auto log = core::logger("iscsi");
  const std::string name = uri_.redacted();
  // Only the sessions that are gone: the live ones keep their commands.
  std::vector<size_t> dead;
  for (size_t i = 0; i < sessions_.size(); ++i)
    if (!sessions_[i].alive()) dead.push_back(i);
  if (dead.empty()) co_return std::error_code{};
  std::vector<ContextPtr> fresh;
  for (size_t i : dead) {
    const uint32_t slot = static_cast<uint32_t>(i);
    // Only trivially destructible captures in a co_await expression (GCC 12).
    auto connect = [this, slot] {
      auto res = connect_session(uri_, options_, slot);
      if (res) {
        // The LUN must still be the one we know: same size and block size.
        iscsi_set_timeout(res.handle.get(), seconds_for_libiscsi(options_.io_timeout));
        auto cap = probe_command([&] { return iscsi_readcapacity16_sync(res.handle.get(), uri_.lun); });
        auto* rc16 = cap && cap->status == SCSI_STATUS_GOOD
                         ? static_cast<scsi_readcapacity16*>(scsi_datain_unmarshall(cap.get()))
                         : nullptr;
        iscsi_set_timeout(res.handle.get(), 0);
        if (rc16 == nullptr) {
          res.err = ECONNRESET;
          res.message = "READ CAPACITY(16) failed after login: " + task_failure(res.handle.get(), cap);
          res.handle.reset();
        } else if (rc16->block_length != info_.block_size || rc16->returned_lba + 1 != info_.blocks) {
          res.err = EIO;
          res.message = "the LUN now has " + std::to_string(rc16->returned_lba + 1) + " blocks of " +
                        std::to_string(rc16->block_length) + " bytes instead of " + std::to_string(info_.blocks) +
                        " of " + std::to_string(info_.block_size) + "; not using it";
          res.handle.reset();
        }
      }
      return res;
    };
    auto res = co_await core::offload(loops_.blocking(), connect);
    if (!res) {
      if (res.err == EIO) {
        log->error("{}: {}", name, res.message);
        co_return errno_code(EIO);
      }
      log->debug("{}: reconnect failed: {}", name, res.message);
      co_return common::reconnect_failure(res.err);
    }
    fresh.push_back(std::move(res.handle));
  }
  for (size_t k = 0; k < dead.size(); ++k) co_await sessions_.install(dead[k], std::move(fresh[k]));
  const uint64_t gen = sessions_.next_generation();
  log->info("{}: reconnected ({} of {} session(s), generation {})", name, dead.size(), sessions_.size(), gen);
  co_return std::error_code{};
}

}  // namespace blockway::remote::iscsi
