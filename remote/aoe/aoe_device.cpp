#include "remote/aoe/aoe_device.hpp"

#include "core/logging.hpp"
#include "remote/aoe/aoe_discovery.hpp"
#include "remote/aoe/aoe_protocol.hpp"
#include "remote/aoe/rtt_estimator.hpp"
#include "remote/backend.hpp"
#include "remote/common/completion.hpp"

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <list>
#include <vector>

namespace blockway::remote::aoe {

using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kMaxWindow = 1024;          // slots, even if a target offers more buffers
// A tag is a slot index (low 10 bits) and that slot's use count (high 22
// bits): a late answer to an earlier use of the slot has another tag, for
// four million uses of the slot.
constexpr unsigned kTagIndexBits = 10;
constexpr uint32_t kTagIndexMask = (1u << kTagIndexBits) - 1;
static_assert(kMaxWindow <= kTagIndexMask + 1);
constexpr size_t kSendBatch = 32;            // frames per sendmmsg
constexpr size_t kRecvBatch = 32;            // frames per recvmmsg
constexpr int kMaxRounds = 64;               // receive rounds before yielding the loop
constexpr auto kReconnectDiscovery = std::chrono::milliseconds(2000);


struct Counters {
  std::atomic<uint64_t> frames_sent{0}, retransmits{0}, answers{0}, short_frames{0}, malformed{0}, foreign{0},
      stale{0}, errors{0}, timeouts{0};
  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) noexcept { c.fetch_add(n, std::memory_order_relaxed); }
};

}  // namespace

enum class OpKind : uint8_t { read, write, flush };

struct AoeDevice::Op {
  OpKind kind = OpKind::read;
  std::byte* data = nullptr;  // read: destination; write: source (never written)
  uint64_t lba = 0;
  uint64_t sectors = 0;
};

class AoeDevice::Session final : public std::enable_shared_from_this<Session> {
 public:
  Session(boost::asio::io_context& ctx, std::string name, AoeAddress address, AoeOptions options)
      : ctx_(ctx),
        name_(std::move(name)),
        address_(std::move(address)),
        options_(options),
        sd_(ctx),
        timer_(ctx),
        log_(core::logger("aoe")) {}

  ~Session() { kill(ENOTCONN, "device closed"); }

  [[nodiscard]] boost::asio::io_context::executor_type executor() { return ctx_.get_executor(); }
  [[nodiscard]] bool on_this_thread() const noexcept { return ctx_.get_executor().running_in_this_thread(); }
  [[nodiscard]] bool alive() const noexcept { return alive_.load(std::memory_order_acquire); }
  [[nodiscard]] const Counters& counters() const noexcept { return counters_; }

  // On the loop thread (or before the loop runs): takes a discovered socket
  // and target, failing whatever was in flight on the old one.
  void install(PacketSocket socket, const TargetInfo& target) {
    kill(ENOTCONN, "replaced by a new session");
    boost::system::error_code ec;
    sd_.assign(socket.fd.release(), ec);  // sd_ owns and closes it from now on
    if (ec) {
      log_->error("{}: cannot watch the AoE socket: {}", name_, ec.message());
      return;
    }
    ifindex_ = socket.ifindex;
    mtu_ = socket.mtu;
    target_ = target;
    // Keep the use counts of slots that survive, so tags stay distinct across sessions.
    slots_.resize(std::clamp<size_t>(target.config.buffer_count, 1, kMaxWindow));
    free_.clear();
    for (size_t i = slots_.size(); i-- > 0;) free_.push_back(static_cast<uint16_t>(i));
    rx_size_ = std::max<size_t>(mtu_, kAtaHeaderSize + kSectorSize) + 64;
    rx_.assign(kRecvBatch * rx_size_, std::byte{0});
    alive_.store(true, std::memory_order_release);
  }

  // Fails every request with `err` and closes the socket.
  void kill(int err, const std::string& why) {
    const bool was_alive = alive_.exchange(false, std::memory_order_acq_rel);
    ++epoch_;
    if (was_alive && (!commands_.empty() || err != ENOTCONN))
      log_->warn("{}: AoE session closed: {} ({} requests in flight fail with {})", name_, why, commands_.size(),
                 std::strerror(err));
    for (auto& s : slots_) s.cmd = nullptr;
    free_.clear();
    for (size_t i = slots_.size(); i-- > 0;) free_.push_back(static_cast<uint16_t>(i));
    busy_ = 0;
    waiting_.clear();
    while (!commands_.empty()) finish(commands_.front().get(), err);
    timer_.cancel();
    timer_armed_ = false;
    read_pending_ = false;
    if (sd_.is_open()) {
      boost::system::error_code ignored;
      sd_.close(ignored);
    }
  }

  template <class H>
  void start(H handler, const Op& op) {
    boost::asio::any_io_executor ex = boost::asio::get_associated_executor(handler, ctx_.get_executor());
    if (!alive()) {
      boost::asio::post(ex, [h = std::move(handler)]() mutable { std::move(h)(errno_code(ENOTCONN)); });
      return;
    }
    auto cmd = std::make_unique<Request>();
    cmd->op = op;
    cmd->executor = std::move(ex);
    cmd->handler = std::make_unique<common::CompletionOf<H>>(std::move(handler));
    Request* c = cmd.get();
    commands_.push_back(std::move(cmd));
    c->pos = std::prev(commands_.end());
    waiting_.push_back(c);
    pump();
    if (busy_ > 0 && !read_pending_) service();
    arm_timer();
  }

 private:
  struct Request {
    Op op;
    uint64_t issued = 0;      // sectors handed to frames so far
    unsigned frames_out = 0;  // frames in flight
    bool fully_issued = false;
    int err = 0;
    boost::asio::any_io_executor executor;
    std::unique_ptr<common::Completion> handler;
    std::list<std::unique_ptr<Request>>::iterator pos;
  };

  struct Slot {
    Request* cmd = nullptr;  // null: free
    uint32_t tag = 0;
    uint32_t uses = 0;       // high bits of the tag
    unsigned count = 0;      // sectors
    size_t data_offset = 0;  // into cmd->op.data
    unsigned retries = 0;
    Clock::time_point first_sent, deadline;
    std::array<std::byte, kAtaHeaderSize> header{};
  };

  // The 48-bit LBA field; LBA28 puts bits 24-27 and the LBA-mode device
  // register bits (0xe0) into its fourth byte.
  [[nodiscard]] uint64_t lba_field(uint64_t lba) const noexcept {
    if (target_.identify.lba48) return lba;
    return (lba & 0xffffff) | (uint64_t{0xe0u | ((lba >> 24) & 0x0f)} << 24);
  }

  // Fills free slots from the queue and sends the new frames.
  void pump() {
    std::array<Slot*, kSendBatch> batch{};
    size_t n = 0;
    const bool ext = target_.identify.lba48;
    while (!free_.empty() && !waiting_.empty()) {
      Request* c = waiting_.front();
      const uint16_t index = free_.back();
      free_.pop_back();
      ++busy_;
      Slot& s = slots_[index];
      s.cmd = c;
      s.tag = (++s.uses << kTagIndexBits) | index;
      s.retries = 0;
      Header h;
      h.shelf = address_.shelf;
      h.slot = address_.slot;
      h.command = aoe::Command::ata;
      h.tag = s.tag;
      AtaArgs a;
      if (c->op.kind == OpKind::flush) {
        s.count = 0;
        s.data_offset = 0;
        a.aflags = ext ? kAtaExtended : 0;
        a.cmd_status = target_.flush_command;
        c->fully_issued = true;
      } else {
        const uint64_t left = c->op.sectors - c->issued;
        s.count = static_cast<unsigned>(std::min<uint64_t>(left, target_.sectors_per_frame));
        s.data_offset = c->issued * kSectorSize;
        const uint64_t lba = c->op.lba + c->issued;
        a.aflags = ext ? kAtaExtended : 0;
        a.sector_count = static_cast<uint8_t>(s.count);
        a.lba = lba_field(lba);
        if (c->op.kind == OpKind::write) {
          a.aflags |= kAtaWrite;
          a.cmd_status = ext ? kAtaWriteSectorsExt : kAtaWriteSectors;
        } else {
          a.cmd_status = ext ? kAtaReadSectorsExt : kAtaReadSectors;
        }
        c->issued += s.count;
        c->fully_issued = c->issued == c->op.sectors;
      }
      encode_ata(s.header, h, a);
      ++c->frames_out;
      if (c->fully_issued) waiting_.pop_front();
      const auto now = Clock::now();
      s.first_sent = now;
      s.deadline = now + rtt_.rto();
      batch[n++] = &s;
      if (n == batch.size()) {
        send_batch(batch.data(), n);
        n = 0;
        if (!alive()) return;
      }
    }
    if (n > 0) send_batch(batch.data(), n);
  }

  // One sendmmsg for `n` frames; write data goes straight from the caller's
  // buffer (second iovec). Frames the kernel refused are left to the
  // retransmission timer.
  void send_batch(Slot* const* frames, size_t n) {
    sockaddr_ll to{};
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(kEtherType);
    to.sll_ifindex = ifindex_;
    to.sll_halen = 6;
    std::memcpy(to.sll_addr, target_.mac.data(), 6);
    std::array<mmsghdr, kSendBatch> msgs{};
    std::array<std::array<iovec, 2>, kSendBatch> iovs{};
    for (size_t i = 0; i < n; ++i) {
      Slot& s = *frames[i];
      iovs[i][0] = {s.header.data(), s.header.size()};
      size_t iovlen = 1;
      if (s.cmd->op.kind == OpKind::write) {
        iovs[i][1] = {s.cmd->op.data + s.data_offset, s.count * kSectorSize};
        iovlen = 2;
      }
      msgs[i].msg_hdr.msg_name = &to;
      msgs[i].msg_hdr.msg_namelen = sizeof to;
      msgs[i].msg_hdr.msg_iov = iovs[i].data();
      msgs[i].msg_hdr.msg_iovlen = iovlen;
    }
    size_t done = 0;
    while (done < n) {
      const int rc = ::sendmmsg(sd_.native_handle(), msgs.data() + done, static_cast<unsigned>(n - done), 0);
      if (rc > 0) {
        done += static_cast<size_t>(rc);
        continue;
      }
      const int e = rc < 0 ? errno : EAGAIN;
      if (e == EINTR) continue;
      if (e == EMSGSIZE) {
        // The MTU shrank under us: rediscover to learn the new frame size.
        kill(ECONNRESET, "a frame no longer fits the MTU of " + address_.interface);
        return;
      }
      if (e != EAGAIN && e != ENOBUFS && e != ENETDOWN && e != ENXIO)
        log_->debug("{}: sendmmsg: {}", name_, std::strerror(e));
      break;  // the rest go out again when their timeout passes
    }
    Counters::bump(counters_.frames_sent, done);
  }

  // Reads every queued answer (until EAGAIN), refills the window, and waits
  // for more while frames are outstanding. Draining to EAGAIN before queueing
  // the wait keeps Asio's edge-triggered readiness from missing frames that
  // arrived while no wait was pending.
  void service() {
    for (int round = 0; round < kMaxRounds; ++round) {
      if (!alive()) return;
      const int got = receive_batch();
      if (got < 0) return;  // killed
      pump();
      if (got == 0) {
        arm_read();
        arm_timer();
        return;
      }
    }
    boost::asio::post(ctx_, [self = shared_from_this(), epoch = epoch_] {
      if (epoch == self->epoch_) self->service();
    });
  }

  void arm_read() {
    if (read_pending_ || busy_ == 0 || !sd_.is_open()) return;
    read_pending_ = true;
    sd_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                   [self = shared_from_this(), epoch = epoch_](const boost::system::error_code& ec) {
                     if (epoch != self->epoch_) return;
                     self->read_pending_ = false;
                     if (ec == boost::asio::error::operation_aborted) return;
                     self->service();
                   });
  }

  // Returns the number of frames read (0: the socket is drained), or -1 if
  // the session died.
  int receive_batch() {
    std::array<mmsghdr, kRecvBatch> msgs{};
    std::array<iovec, kRecvBatch> iovs{};
    std::array<sockaddr_ll, kRecvBatch> from{};
    for (size_t i = 0; i < kRecvBatch; ++i) {
      iovs[i] = {rx_.data() + i * rx_size_, rx_size_};
      msgs[i].msg_hdr.msg_iov = &iovs[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &from[i];
      msgs[i].msg_hdr.msg_namelen = sizeof from[i];
    }
    const int n = ::recvmmsg(sd_.native_handle(), msgs.data(), kRecvBatch, MSG_DONTWAIT, nullptr);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return 0;
      log_->warn("{}: receiving from {}: {}", name_, address_.interface, std::strerror(errno));
      return 0;  // transient (e.g. ENETDOWN): the give-up deadline decides
    }
    const uint64_t epoch = epoch_;
    for (int i = 0; i < n; ++i) {
      const bool truncated = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
      handle(std::span<const std::byte>(rx_.data() + static_cast<size_t>(i) * rx_size_, msgs[i].msg_len), from[i],
             truncated);
      if (epoch != epoch_) return -1;
    }
    return n;
  }

  void handle(std::span<const std::byte> p, const sockaddr_ll& from, bool truncated) {
    if (from.sll_pkttype == PACKET_OUTGOING) return;  // our own frame, if the kernel still shows it
    if (truncated) {
      Counters::bump(counters_.malformed);
      return;
    }
    auto h = decode_header(p);
    if (!h) {
      Counters::bump(counters_.short_frames);
      return;
    }
    if (h->version != kVersion) {
      Counters::bump(counters_.malformed);
      return;
    }
    if (!(h->flags & kFlagResponse) || from.sll_halen != 6 ||
        std::memcmp(from.sll_addr, target_.mac.data(), 6) != 0 || h->shelf != address_.shelf ||
        h->slot != address_.slot) {
      Counters::bump(counters_.foreign);
      return;
    }
    const size_t index = h->tag & kTagIndexMask;
    if (h->command != aoe::Command::ata || index >= slots_.size() || slots_[index].cmd == nullptr ||
        slots_[index].tag != h->tag) {
      Counters::bump(counters_.stale);
      return;
    }
    Slot& s = slots_[index];
    if (h->flags & kFlagError) {
      Counters::bump(counters_.errors);
      log_->warn("{}: target answered with AoE error {} ({})", name_, h->error, error_name(h->error));
      complete(s, EIO);
      return;
    }
    auto a = decode_ata(p);
    if (!a) {
      Counters::bump(counters_.short_frames);
      return;
    }
    if (a->cmd_status & (kAtaStatusErr | kAtaStatusDf)) {
      Counters::bump(counters_.errors);
      log_->warn("{}: ATA command failed: status {:#04x}, error {:#04x}", name_, a->cmd_status, a->err_feature);
      complete(s, EIO);
      return;
    }
    if (s.cmd->op.kind == OpKind::read) {
      const size_t bytes = s.count * kSectorSize;
      if (p.size() < kAtaHeaderSize + bytes) {
        Counters::bump(counters_.malformed);  // keep waiting: the retransmission may get a whole answer
        return;
      }
      std::memcpy(s.cmd->op.data + s.data_offset, p.data() + kAtaHeaderSize, bytes);
    }
    Counters::bump(counters_.answers);
    complete(s, 0);
  }

  void complete(Slot& s, int err) {
    if (err == 0 && s.retries == 0)  // Karn: a retransmitted frame's RTT is ambiguous
      rtt_.sample(std::chrono::duration_cast<RttEstimator::Duration>(Clock::now() - s.first_sent));
    Request* c = s.cmd;
    s.cmd = nullptr;
    free_.push_back(static_cast<uint16_t>(&s - slots_.data()));
    if (--busy_ == 0 && timer_armed_) {
      // Idle: leave no timer pending, so the loop can finish at shutdown.
      timer_armed_ = false;
      ++timer_gen_;
      timer_.cancel();
    }
    if (err != 0 && c->err == 0) c->err = err;
    if (--c->frames_out == 0 && c->fully_issued) finish(c, c->err);
  }

  void finish(Request* c, int err) {
    const std::error_code ec = err ? errno_code(err) : std::error_code{};
    boost::asio::post(c->executor, [h = std::move(c->handler), ec] { h->complete(ec); });
    commands_.erase(c->pos);
  }

  void arm_timer() {
    if (timer_armed_ || busy_ == 0 || !alive()) return;
    auto next = Clock::time_point::max();
    for (const auto& s : slots_)
      if (s.cmd != nullptr) next = std::min({next, s.deadline, s.first_sent + options_.io_timeout});
    timer_armed_ = true;
    timer_.expires_at(next);
    auto handler = [self = shared_from_this(), epoch = epoch_, gen = ++timer_gen_](
                       const boost::system::error_code& ec) {
      if (epoch != self->epoch_ || gen != self->timer_gen_) return;
      self->timer_armed_ = false;
      if (!ec) self->on_timer();
    };
    timer_.async_wait(std::move(handler));
  }

  void on_timer() {
    if (!alive()) return;
    const auto now = Clock::now();
    std::array<Slot*, kSendBatch> batch{};
    size_t n = 0;
    for (auto& s : slots_) {
      if (s.cmd == nullptr) continue;
      if (now >= s.first_sent + options_.io_timeout) {
        Counters::bump(counters_.timeouts);
        kill(ETIMEDOUT, "no answer from " + format_mac(target_.mac) + " within io-timeout (" +
                            std::to_string(options_.io_timeout.count()) + " ms, " + std::to_string(s.retries) +
                            " retransmissions)");
        return;
      }
      if (now < s.deadline) continue;
      ++s.retries;
      s.deadline = now + rtt_.backoff(s.retries);
      batch[n++] = &s;
      if (n == batch.size()) {
        Counters::bump(counters_.retransmits, n);
        send_batch(batch.data(), n);
        n = 0;
        if (!alive()) return;
      }
    }
    if (n > 0) {
      Counters::bump(counters_.retransmits, n);
      send_batch(batch.data(), n);
    }
    if (alive()) {
      if (busy_ > 0 && !read_pending_) service();
      arm_timer();
    }
  }

  boost::asio::io_context& ctx_;
  std::string name_;
  AoeAddress address_;
  AoeOptions options_;
  boost::asio::posix::stream_descriptor sd_;
  boost::asio::steady_timer timer_;
  std::shared_ptr<spdlog::logger> log_;
  int ifindex_ = 0;
  unsigned mtu_ = 0;
  TargetInfo target_;
  RttEstimator rtt_;
  std::vector<Slot> slots_;
  std::vector<uint16_t> free_;  // indexes of free slots (a stack: warm ones first)
  size_t busy_ = 0;
  std::list<std::unique_ptr<Request>> commands_;  // every request not yet finished
  std::deque<Request*> waiting_;                  // requests with frames still to issue
  size_t rx_size_ = 0;
  std::vector<std::byte> rx_;
  bool read_pending_ = false;
  bool timer_armed_ = false;
  uint64_t timer_gen_ = 0;  // bumped when the timer is cancelled or re-armed: older handlers are stale
  uint64_t epoch_ = 0;  // bumped by kill(): handlers of older waits are stale
  std::atomic<bool> alive_{false};
  Counters counters_;
};

namespace {

std::string describe_target(const TargetInfo& t, unsigned mtu) {
  return format_mac(t.mac) + ", " + std::to_string(t.identify.sectors) + " sectors" +
         (t.identify.lba48 ? " (LBA48)" : " (LBA28)") + ", " + std::to_string(t.config.buffer_count) +
         " buffers, " + std::to_string(t.sectors_per_frame) + " sectors per frame at MTU " + std::to_string(mtu) +
         ", firmware " + std::to_string(t.config.firmware) + ", flush " +
         (t.flush_command == kAtaFlushCacheExt ? "FLUSH CACHE EXT" : "FLUSH CACHE") +
         (t.identify.model.empty() ? "" : ", model '" + t.identify.model + "'");
}

Task<void> install_on(std::shared_ptr<AoeDevice::Session> session, std::shared_ptr<DiscoverResult> found) {
  session->install(std::move(found->socket), found->target);
  co_return;
}

}  // namespace

AoeDevice::AoeDevice(std::string uri, AoeAddress address, AoeOptions options, bool read_only,
                     core::EventLoops& loops)
    : uri_(std::move(uri)), address_(std::move(address)), options_(options), loops_(loops) {
  DiscoverResult found = discover(address_, options_.discover_timeout);
  if (found.err != 0) throw BackendError("'" + uri_ + "': " + found.message);
  geometry_.size = found.target.identify.sectors * kSectorSize;
  geometry_.min_block = kSectorSize;
  geometry_.preferred_block = 4096;
  geometry_.max_transfer = core::kDefaultMaxTransfer;
  caps_.read_only = read_only;
  caps_.flush = Support::native;
  caps_.multi_conn = true;  // one session: a flush covers every completed write
  core::logger("aoe")->info("{}: {}", uri_, describe_target(found.target, found.socket.mtu));
  session_ = std::make_shared<Session>(loops_.next(), uri_, address_, options_);
  session_->install(std::move(found.socket), found.target);  // the loops do not run yet
}

AoeDevice::~AoeDevice() {
  const AoeStats s = stats();
  core::logger("aoe")->info(
      "{}: frames sent {}, retransmitted {}, answers {}, errors {}, session timeouts {}; ignored {} "
      "(short {}, malformed {}, foreign {}, stale {})",
      uri_, s.frames_sent, s.retransmits, s.answers, s.errors, s.timeouts, s.ignored(), s.short_frames,
      s.malformed, s.foreign, s.stale);
  session_->kill(ENOTCONN, "device closed");
}

AoeStats AoeDevice::stats() const noexcept {
  const Counters& c = session_->counters();
  auto get = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  AoeStats s;
  s.frames_sent = get(c.frames_sent);
  s.retransmits = get(c.retransmits);
  s.answers = get(c.answers);
  s.short_frames = get(c.short_frames);
  s.malformed = get(c.malformed);
  s.foreign = get(c.foreign);
  s.stale = get(c.stale);
  s.errors = get(c.errors);
  s.timeouts = get(c.timeouts);
  return s;
}

bool AoeDevice::connected() const noexcept { return session_->alive(); }

Task<std::error_code> AoeDevice::submit(Op op) {
  Session& s = *session_;
  if (!s.on_this_thread()) {
    auto task = submit(op);  // outside the co_await (GCC 12)
    co_return co_await boost::asio::co_spawn(s.executor(), std::move(task), boost::asio::use_awaitable);
  }
  co_return co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
      [&s](auto handler, Op o) { s.start(std::move(handler), o); }, boost::asio::use_awaitable, op);
}

Task<std::error_code> AoeDevice::read(std::span<std::byte> buf, uint64_t offset, IoFlags /*flags*/) {
  if (buf.empty()) co_return std::error_code{};
  if (offset % kSectorSize != 0 || buf.size() % kSectorSize != 0 || offset > geometry_.size ||
      buf.size() > geometry_.size - offset)
    co_return errno_code(EINVAL);
  co_return co_await submit(Op{OpKind::read, buf.data(), offset / kSectorSize, buf.size() / kSectorSize});
}

Task<std::error_code> AoeDevice::write(std::span<const std::byte> buf, uint64_t offset, IoFlags /*flags*/) {
  if (caps_.read_only) co_return errno_code(EPERM);
  if (buf.empty()) co_return std::error_code{};
  if (offset % kSectorSize != 0 || buf.size() % kSectorSize != 0 || offset > geometry_.size ||
      buf.size() > geometry_.size - offset)
    co_return errno_code(EINVAL);
  // The data is only ever read (sent); Op has one pointer type for both directions.
  auto* data = const_cast<std::byte*>(buf.data());
  co_return co_await submit(Op{OpKind::write, data, offset / kSectorSize, buf.size() / kSectorSize});
}

Task<std::error_code> AoeDevice::flush() {
  if (caps_.read_only) co_return std::error_code{};
  co_return co_await submit(Op{OpKind::flush, nullptr, 0, 0});
}

Task<std::error_code> AoeDevice::reconnect() {
  auto log = core::logger("aoe");
  const auto timeout = std::min(options_.discover_timeout, std::chrono::milliseconds(kReconnectDiscovery));
  // Only trivially destructible captures in a co_await expression (GCC 12
  // destroys some temporaries of such expressions twice); address_ is
  // never modified after construction, so the pool thread may read it.
  auto rediscover = [this, timeout] { return std::make_shared<DiscoverResult>(discover(address_, timeout)); };
  std::shared_ptr<DiscoverResult> found = co_await core::offload(loops_.blocking(), rediscover);
  if (found->err != 0) {
    log->debug("{}: rediscovery failed: {}", uri_, found->message);
    const std::error_code ec = errno_code(found->err);
    co_return core::is_connection_error(ec) ? ec : errno_code(EHOSTUNREACH);
  }
  const uint64_t size = found->target.identify.sectors * kSectorSize;
  if (size != geometry_.size) {
    log->error("{}: after rediscovery the target has {} bytes instead of {}; not using it", uri_, size,
               geometry_.size);
    co_return errno_code(EIO);
  }
  auto task = install_on(session_, found);  // outside the co_await (GCC 12)
  co_await boost::asio::co_spawn(session_->executor(), std::move(task), boost::asio::use_awaitable);
  const uint64_t gen = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;
  log->info("{}: rediscovered {} (generation {})", uri_, describe_target(found->target, found->socket.mtu), gen);
  co_return std::error_code{};
}

}  // namespace blockway::remote::aoe
