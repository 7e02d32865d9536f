#include "nbd/session.hpp"

#include "core/logging.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace blockway::nbd {
namespace {

using core::Task;

// Small enough that little of a large write's payload is read here and then
// copied; large enough to take hundreds of pipelined headers per read().
constexpr size_t kReceiveBuffer = 64u << 10;
// Every admitted request is charged at least this much, so that a flood of
// small requests whose replies are never read is bounded too.
constexpr uint64_t kReplyOverhead = 64;
// A write of at least this many bytes is read straight into its payload
// buffer, together with the next request's header only (see reader()).
constexpr uint64_t kDirectPayload = 32u << 10;
// A write larger than the limit is read and thrown away to stay in sync with
// the client, up to this size; beyond it the connection is dropped.
constexpr uint64_t kMaxDiscard = 1ull << 30;

bool all_zero(const std::byte* p, size_t n) {
  if (n == 0) return false;
  // Check a short prefix byte by byte, then compare the buffer with itself
  // shifted: memcmp runs at memory speed and stops at the first difference.
  const size_t head = std::min<size_t>(n, 16);
  for (size_t i = 0; i < head; ++i)
    if (p[i] != std::byte{0}) return false;
  return n <= 16 || std::memcmp(p, p + 16, n - 16) == 0;
}

uint16_t allowed_flags(uint16_t type, bool structured) {
  switch (type) {
    case kCmdRead: return kCmdFlagFua | (structured ? kCmdFlagDf : 0);
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache: return kCmdFlagFua;
    case kCmdWriteZeroes: return kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
    case kCmdBlockStatus: return kCmdFlagFua | kCmdFlagReqOne;
    default: return 0;
  }
}

}  // namespace

Session::Session(Channel& channel, Negotiated negotiated, SessionLimits limits)
    : channel_(channel),
      neg_(std::move(negotiated)),
      limits_(limits),
      device_(*neg_.exp->device),
      log_(core::logger("nbd")),
      rbuf_(std::make_unique_for_overwrite<std::byte[]>(kReceiveBuffer)),
      writer_wakeup_(channel.executor()),
      budget_freed_(channel.executor()),
      drained_(channel.executor()) {
  neg_.exp->clients.fetch_add(1, std::memory_order_relaxed);
}

Session::~Session() { neg_.exp->clients.fetch_sub(1, std::memory_order_relaxed); }

void Session::stop() {
  stopping_ = true;
  if (reader_idle_) channel_.cancel_read();
}

void Session::stop_when_quiet(std::chrono::milliseconds limit) {
  stop_when_quiet_ = true;
  quiet_limit_ = std::make_unique<boost::asio::steady_timer>(channel_.executor(), limit);
  quiet_limit_->async_wait([weak = weak_from_this()](boost::system::error_code ec) {
    auto self = weak.lock();
    if (ec || !self || self->read_shut_) return;
    self->log_->debug("export '{}': no quiet moment on a kernel device's connection, stopping it", self->neg_.exp->name);
    self->stop();
  });
  shut_if_quiet();
}

void Session::shut_if_quiet() {
  // reader_idle_: the reader waits for a new request with nothing half-read.
  if (!stop_when_quiet_ || read_shut_ || stopping_ || dead_ || pending_requests_ > 0 || !reader_idle_) return;
  const int fd = channel_.in().native_handle();
  int queued = 0;
  if (::ioctl(fd, FIONREAD, &queued) != 0 || queued > 0) return;
  read_shut_ = true;
  if (quiet_limit_) quiet_limit_->cancel();
  ::shutdown(fd, SHUT_RD);  // the reader reads what slipped in, then end of file
}

Task<void> Session::run() {
  auto self = shared_from_this();
  boost::asio::co_spawn(channel_.executor(), [self] { return self->writer(); }, boost::asio::detached);
  co_await reader();
  while (pending_requests_ > 0) co_await drained_.wait();
  writer_stop_ = true;
  writer_wakeup_.notify();
  while (!writer_done_) co_await drained_.wait();
  if (quiet_limit_) quiet_limit_->cancel();
}

Task<void> Session::flush_if_dirty() {
  if (!dirty_) co_return;
  dirty_ = false;
  if (auto ec = co_await device_.flush())
    log_->warn("export '{}': flush after disconnect failed: {}", neg_.exp->name, ec.message());
}

bool Session::try_admit(uint64_t bytes) {
  bytes += kReplyOverhead;
  if (dead_) return false;
  if (pending_requests_ > 0 && (pending_requests_ >= limits_.max_inflight_requests ||
                                pending_bytes_ + bytes > limits_.max_inflight_bytes))
    return false;
  ++pending_requests_;
  pending_bytes_ += bytes;
  return true;
}

Task<bool> Session::admit(uint64_t bytes) {
  bytes += kReplyOverhead;
  while (pending_requests_ > 0 && (pending_requests_ >= limits_.max_inflight_requests ||
                                   pending_bytes_ + bytes > limits_.max_inflight_bytes)) {
    if (dead_) co_return false;
    co_await budget_freed_.wait();
  }
  if (dead_) co_return false;
  ++pending_requests_;
  pending_bytes_ += bytes;
  co_return true;
}

void Session::release(const Reply& reply) {
  --pending_requests_;
  pending_bytes_ -= reply.budget;
  budget_freed_.notify();
  if (pending_requests_ == 0) {
    drained_.notify();
    shut_if_quiet();
  }
}

void Session::refuse(const RequestHeader& req, std::error_code ec) {
  Reply r = error_reply(req, ec);
  r.budget = kReplyOverhead;  // what admit(0) charged
  enqueue(std::move(r));
}

void Session::enqueue(Reply reply) {
  queue_.push_back(std::move(reply));
  writer_wakeup_.notify();
}

Task<bool> Session::discard_payload(uint64_t length) {
  const uint64_t buffered = std::min<uint64_t>(length, rtail_ - rhead_);
  rhead_ += buffered;
  length -= buffered;
  while (length > 0) {
    const size_t n = std::min<uint64_t>(length, kReceiveBuffer);
    if (co_await channel_.read_exact({rbuf_.get(), n})) co_return false;
    length -= n;
  }
  co_return true;
}

Task<void> Session::reader() {
  static const std::error_code eof = boost::system::error_code(boost::asio::error::eof);
  static const std::error_code aborted = boost::system::error_code(boost::asio::error::operation_aborted);
  while (!dead_) {
    // Make sure one whole request header is buffered.
    while (rtail_ - rhead_ < kRequestHeaderSize) {
      if (rhead_ == rtail_) {
        rhead_ = rtail_ = 0;
        if (stopping_) co_return;
      } else if (kReceiveBuffer - rhead_ < kRequestHeaderSize) {
        std::memmove(rbuf_.get(), rbuf_.get() + rhead_, rtail_ - rhead_);
        rtail_ -= rhead_;
        rhead_ = 0;
      }
      reader_idle_ = rhead_ == rtail_;
      shut_if_quiet();
      // After a large write, read only the rest of a header: a full buffer
      // would take the start of the next payload, to be copied out again.
      size_t want = kReceiveBuffer - rtail_;
      if (header_only_) want = std::min(want, kRequestHeaderSize - (rtail_ - rhead_));
      auto [ec, n] = co_await channel_.read_some({rbuf_.get() + rtail_, want});
      reader_idle_ = false;
      if (ec || n == 0) {
        if (ec && ec != eof && ec != aborted)
          log_->debug("export '{}': read from client failed: {}", neg_.exp->name, ec.message());
        co_return;
      }
      rtail_ += n;
    }
    const RequestHeader req = RequestHeader::decode(rbuf_.get() + rhead_);
    rhead_ += kRequestHeaderSize;
    if (req.magic != kRequestMagic) {
      log_->warn("export '{}': bad request magic {:#x}, dropping the connection", neg_.exp->name, req.magic);
      co_return;
    }
    log_->trace("request type {} flags {:#x} offset {} length {}", req.type, req.flags, req.offset, req.length);
    if (req.type == kCmdDisc) co_return;

    Buffer payload;
    const bool too_big = req.length > limits_.max_request_bytes;
    if (req.type == kCmdWrite && too_big) {
      if (req.length > kMaxDiscard || !co_await discard_payload(req.length)) co_return;
      if (!try_admit(0) && !co_await admit(0)) co_return;
      refuse(req, core::errno_code(EINVAL));
      continue;
    }
    if (req.type == kCmdRead && too_big) {
      if (!try_admit(0) && !co_await admit(0)) co_return;
      refuse(req, core::errno_code(EINVAL));
      continue;
    }
    const uint64_t charge = (req.type == kCmdWrite || req.type == kCmdRead) ? req.length : 0;
    if (!try_admit(charge) && !co_await admit(charge)) co_return;
    header_only_ = false;
    if (req.type == kCmdWrite) {
      payload = Buffer(req.length);
      const size_t buffered = std::min<size_t>(req.length, rtail_ - rhead_);
      if (buffered) std::memcpy(payload.data(), rbuf_.get() + rhead_, buffered);  // data() is null when empty
      rhead_ += buffered;
      std::error_code ec;
      if (buffered < req.length && req.length >= kDirectPayload) {
        // The rest of the payload straight into its buffer (no copy out of
        // the receive buffer), and the next header in the same readv.
        rhead_ = rtail_ = 0;  // all consumed
        const auto [rec, extra] = co_await channel_.read_exact_then(
            {payload.data() + buffered, req.length - buffered}, {rbuf_.get(), kRequestHeaderSize});
        ec = rec;
        rtail_ = extra;
        header_only_ = true;
      } else if (buffered < req.length) {
        ec = co_await channel_.read_exact({payload.data() + buffered, req.length - buffered});
      }
      if (ec) {
        --pending_requests_;  // admitted but never started
        pending_bytes_ -= charge + kReplyOverhead;
        if (pending_requests_ == 0) drained_.notify();
        co_return;
      }
    }
    boost::asio::co_spawn(channel_.executor(),
                          handle(req, std::move(payload), charge + kReplyOverhead),
                          boost::asio::detached);
  }
}

Task<void> Session::handle(RequestHeader req, Buffer payload, uint64_t budget) {
  auto self = shared_from_this();
  Reply reply;
  try {
    reply = co_await execute(req, payload);
  } catch (const std::exception& e) {
    log_->error("export '{}': request type {} failed: {}", neg_.exp->name, req.type, e.what());
    reply = error_reply(req, core::errno_code(EIO));
  }
  reply.budget = budget;
  enqueue(std::move(reply));
}

Task<Session::Reply> Session::execute(const RequestHeader& req, Buffer& payload) {
  const bool structured = neg_.structured_replies;
  if (req.flags & ~allowed_flags(req.type, structured)) co_return error_reply(req, core::errno_code(EINVAL));
  const core::IoFlags fua = (req.flags & kCmdFlagFua) ? core::kFua : 0;
  const core::ByteRange range{req.offset, req.length};
  std::error_code ec;
  switch (req.type) {
    case kCmdRead: {
      Buffer data(req.length);
      ec = co_await device_.read(data.span(), req.offset, 0);
      if (ec) break;
      co_return read_reply(req, std::move(data));
    }
    case kCmdWrite:
      ec = co_await device_.write(payload.span(), req.offset, fua);
      dirty_ |= !ec;
      break;
    case kCmdFlush:
      ec = co_await device_.flush();
      if (!ec) dirty_ = false;
      break;
    case kCmdTrim:
      ec = co_await device_.trim(range, fua);
      dirty_ |= !ec;
      break;
    case kCmdCache:
      ec = co_await device_.prefetch(range);
      break;
    case kCmdWriteZeroes: {
      core::IoFlags flags = fua;
      if (req.flags & kCmdFlagNoHole) flags |= core::kNoHole;
      if (req.flags & kCmdFlagFastZero) flags |= core::kFastZero;
      ec = co_await device_.zero(range, flags);
      dirty_ |= !ec;
      break;
    }
    case kCmdBlockStatus: {
      if (!structured || neg_.contexts.empty()) {
        ec = core::errno_code(EINVAL);
        break;
      }
      Reply reply;
      for (size_t i = 0; i < neg_.contexts.size(); ++i) {
        core::ExtentList extents;
        if (neg_.contexts[i].kind == MetaContextKind::cache) {
          const uint64_t size = device_.geometry().size;
          if (range.length == 0 || range.offset > size || range.length > size - range.offset)
            ec = core::errno_code(EINVAL);
          else
            ec = co_await neg_.exp->cache_status(range, extents);
        } else {
          ec = co_await device_.block_status(range, extents);
        }
        if (ec) break;
        if (req.flags & kCmdFlagReqOne) extents.resize(1);
        Reply chunk = block_status_reply(req, neg_.contexts[i].id, extents);
        if (i + 1 == neg_.contexts.size()) {
          put16(chunk.head.data() + 4, kReplyFlagDone);
          if (i == 0) co_return chunk;
        }
        // Several contexts: their chunks travel in one reply's extra bytes.
        reply.extra.insert(reply.extra.end(), chunk.head.begin(), chunk.head.begin() + chunk.head_len);
        reply.extra.insert(reply.extra.end(), chunk.extra.begin(), chunk.extra.end());
      }
      if (ec) break;
      co_return reply;
    }
    default:
      ec = core::errno_code(EINVAL);
      break;
  }
  if (ec) co_return error_reply(req, ec);
  co_return simple_reply(req.cookie, 0);
}

Task<void> Session::writer() {
  auto self = shared_from_this();
  while (true) {
    while (queue_.empty()) {
      if (writer_stop_) {
        writer_done_ = true;
        drained_.notify();
        co_return;
      }
      co_await writer_wakeup_.wait();
    }
    sending_.swap(queue_);
    std::error_code ec;
    if (!dead_) {
      iov_.clear();
      for (const auto& r : sending_) {
        iov_.emplace_back(r.head.data(), r.head_len);
        if (!r.extra.empty()) iov_.emplace_back(r.extra.data(), r.extra.size());
        if (!r.data.empty()) iov_.emplace_back(r.data.data(), r.data.size());
      }
      ec = co_await channel_.write_all(iov_);
    }
    for (const auto& r : sending_) release(r);
    sending_.clear();
    if (ec && !dead_) {
      log_->debug("export '{}': write to client failed: {}", neg_.exp->name, ec.message());
      dead_ = true;
      channel_.cancel_read();  // wake the reader so the session can end
      budget_freed_.notify();
    }
  }
}

Session::Reply Session::simple_reply(uint64_t cookie, uint32_t error) const {
  Reply r;
  put32(r.head.data(), kSimpleReplyMagic);
  put32(r.head.data() + 4, error);
  put64(r.head.data() + 8, cookie);
  r.head_len = kSimpleReplySize;
  return r;
}

Session::Reply Session::error_reply(const RequestHeader& req, std::error_code ec) const {
  const uint32_t error = to_nbd_error(ec);
  log_->debug("export '{}': request type {} offset {} length {}: {}", neg_.exp->name, req.type, req.offset,
              req.length, ec.message());
  if (!neg_.structured_replies) return simple_reply(req.cookie, error);
  Reply r;
  const std::string message = ec.message();
  r.extra.resize(6 + message.size());
  put32(r.extra.data(), error);
  put16(r.extra.data() + 4, static_cast<uint16_t>(message.size()));
  std::memcpy(r.extra.data() + 6, message.data(), message.size());
  put32(r.head.data(), kStructuredReplyMagic);
  put16(r.head.data() + 4, kReplyFlagDone);
  put16(r.head.data() + 6, kReplyError);
  put64(r.head.data() + 8, req.cookie);
  put32(r.head.data() + 16, static_cast<uint32_t>(r.extra.size()));
  r.head_len = kStructuredHeaderSize;
  return r;
}

Session::Reply Session::read_reply(const RequestHeader& req, Buffer data) const {
  if (!neg_.structured_replies) {
    Reply r = simple_reply(req.cookie, 0);
    r.data = std::move(data);
    return r;
  }
  Reply r;
  put32(r.head.data(), kStructuredReplyMagic);
  put16(r.head.data() + 4, kReplyFlagDone);
  put64(r.head.data() + 8, req.cookie);
  if (data.empty()) {  // a data chunk must carry at least one byte
    put16(r.head.data() + 6, kReplyNone);
    put32(r.head.data() + 16, 0);
    r.head_len = kStructuredHeaderSize;
    return r;
  }
  put64(r.head.data() + 20, req.offset);
  if (all_zero(data.data(), data.size())) {
    // Zeroes travel as a 12-byte hole instead of their full length.
    put16(r.head.data() + 6, kReplyOffsetHole);
    put32(r.head.data() + 16, 12);
    put32(r.head.data() + 28, static_cast<uint32_t>(data.size()));
    r.head_len = kStructuredHeaderSize + 12;
    return r;
  }
  put16(r.head.data() + 6, kReplyOffsetData);
  put32(r.head.data() + 16, static_cast<uint32_t>(8 + data.size()));
  r.head_len = kStructuredHeaderSize + 8;
  r.data = std::move(data);
  return r;
}

Session::Reply Session::block_status_reply(const RequestHeader& req, uint32_t context_id,
                                           const core::ExtentList& extents) const {
  Reply r;
  r.extra.resize(4 + 8 * extents.size());
  put32(r.extra.data(), context_id);
  std::byte* p = r.extra.data() + 4;
  for (const auto& e : extents) {
    put32(p, static_cast<uint32_t>(e.length));
    uint32_t flags = 0;
    if (e.flags & core::kExtentHole) flags |= kStateHole;
    if (e.flags & core::kExtentZero) flags |= kStateZero;
    put32(p + 4, flags);
    p += 8;
  }
  put32(r.head.data(), kStructuredReplyMagic);
  put16(r.head.data() + 4, 0);
  put16(r.head.data() + 6, kReplyBlockStatus);
  put64(r.head.data() + 8, req.cookie);
  put32(r.head.data() + 16, static_cast<uint32_t>(r.extra.size()));
  r.head_len = kStructuredHeaderSize;
  return r;
}

}  // namespace blockway::nbd
