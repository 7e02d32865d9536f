// Session: the NBD transmission phase of one connection.
//
// A reader coroutine parses requests out of a large receive buffer (many per
// read() when the client pipelines) and starts one handler coroutine per
// request; a large write's payload (32 KiB and more) is read straight into
// its own buffer instead, with just the next header behind it, so that it
// is not copied out of the receive buffer (issue 17); handlers complete in
// any order and queue their replies; a writer coroutine sends every queued
// reply with one gathered write. Memory is bounded: a request is admitted
// only while the bytes of requests whose replies are not yet sent stay
// under max_inflight_bytes (one request is always admitted), so a client
// that stops reading replies stalls its own connection instead of growing
// the daemon.
//
// Thread model: everything runs on the connection's io_context (one thread);
// no locks. The export's device is shared with other sessions and is
// thread-safe itself.
#pragma once

#include "core/async_event.hpp"
#include "core/buffer_pool.hpp"
#include "nbd/channel.hpp"
#include "nbd/handshake.hpp"
#include "nbd/protocol.hpp"

#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <deque>
#include <memory>
#include <vector>

namespace blockway::nbd {

struct SessionLimits {
  uint32_t max_request_bytes = 32u << 20;
  uint64_t max_inflight_bytes = 128ull << 20;
  uint32_t max_inflight_requests = 1024;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Channel& channel, Negotiated negotiated, SessionLimits limits);
  ~Session();

  // Serves requests until the client disconnects, breaks the protocol, or
  // stop() is called; returns once every admitted request has been answered
  // (or the client is gone). Does not close the channel.
  core::Task<void> run();
  // A client that left without flushing still gets its writes made durable;
  // called after the connection is closed, so the client does not wait.
  core::Task<void> flush_if_dirty();
  // Graceful end: read no further requests, finish those in flight. Must be
  // called on the session's io_context.
  void stop();
  // A kernel device's graceful end (the daemon stops): go on serving until
  // the kernel has no request with us (none admitted, none in the socket),
  // then shut the socket's receiving side. The kernel's next send fails and
  // it requeues that request for the next daemon at once; stop() would leave
  // the requests already in the socket unread, and the kernel would wait
  // its timeout for their answers. Requests that slip in before the shutdown
  // are still read and answered. Falls back to stop() after `limit` without
  // such a moment. Must be called on the session's io_context.
  void stop_when_quiet(std::chrono::milliseconds limit);

 private:
  using Buffer = core::IoBuffer;
  struct Reply {
    std::array<std::byte, 32> head;
    uint8_t head_len = 0;
    std::vector<std::byte> extra;  // block-status descriptors, error text
    Buffer data;                   // read payload
    uint64_t budget = 0;           // admitted bytes, released once sent
  };

  core::Task<void> reader();
  core::Task<void> writer();
  core::Task<void> handle(RequestHeader req, Buffer payload, uint64_t budget);
  core::Task<Reply> execute(const RequestHeader& req, Buffer& payload);
  // Admits at once when the budget has room (no coroutine frame: the common
  // case, once per request); admit() waits for room.
  bool try_admit(uint64_t bytes);
  core::Task<bool> admit(uint64_t bytes);
  core::Task<bool> discard_payload(uint64_t length);
  void enqueue(Reply reply);
  // Answers an admitted request with an error without running it.
  void refuse(const RequestHeader& req, std::error_code ec);
  void release(const Reply& reply);
  // stop_when_quiet(): shuts the receiving side if nothing is in flight.
  void shut_if_quiet();

  [[nodiscard]] Reply simple_reply(uint64_t cookie, uint32_t error) const;
  [[nodiscard]] Reply error_reply(const RequestHeader& req, std::error_code ec) const;
  [[nodiscard]] Reply read_reply(const RequestHeader& req, Buffer data) const;
  [[nodiscard]] Reply block_status_reply(const RequestHeader& req, uint32_t context_id,
                                         const core::ExtentList& extents) const;

  Channel& channel_;
  Negotiated neg_;
  SessionLimits limits_;
  core::CheckedDevice& device_;
  std::shared_ptr<spdlog::logger> log_;

  // Receive buffer: requests are parsed in place.
  std::unique_ptr<std::byte[]> rbuf_;
  size_t rhead_ = 0, rtail_ = 0;

  std::vector<Reply> queue_;    // replies waiting for the writer
  std::vector<Reply> sending_;  // replies in the current gathered write
  std::vector<boost::asio::const_buffer> iov_;

  uint64_t pending_requests_ = 0;  // admitted, reply not yet sent
  uint64_t pending_bytes_ = 0;
  bool stopping_ = false;
  bool header_only_ = false;  // the last request was a large write read straight into its buffer
  bool reader_idle_ = false;  // waiting for a new request header, nothing half-read
  bool dead_ = false;         // the client can no longer be written to
  bool writer_stop_ = false;
  bool writer_done_ = false;
  bool dirty_ = false;  // data changed since the last flush
  bool stop_when_quiet_ = false;
  bool read_shut_ = false;  // shut_if_quiet() shut the receiving side
  std::unique_ptr<boost::asio::steady_timer> quiet_limit_;

  core::AsyncEvent writer_wakeup_;
  core::AsyncEvent budget_freed_;
  core::AsyncEvent drained_;
};

}  // namespace blockway::nbd
