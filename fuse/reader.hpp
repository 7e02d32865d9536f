// Reader: reads FUSE requests from one dup() of the /dev/fuse descriptor on
// one event loop and hands each to libfuse (fuse_session_process_buf), which
// calls the operations on that loop.
//
// Thread model: a reader lives on its loop: its descriptor, its receive
// buffer and its counters are touched only there (stop() posts to it).
// Reader::current is the reader whose request is being processed on this
// thread, so that an operation can take its buffer (a write's payload is
// used in place) or ask for its loop. Asio's descriptor read tries read()
// before it waits and after every epoll event, so no request is left behind
// by an edge-triggered wakeup.
#pragma once

#include "core/buffer_pool.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

struct fuse_session;

namespace spdlog {
class logger;
}

namespace blockway::fuse {

// Largest read or write the kernel sends in one request. libfuse 3.14 caps
// max_write at its receive buffer (256 pages); the kernel's max_pages follows.
inline constexpr uint32_t kMaxIo = 1u << 20;

// Test hook: the next `count` allocations of a reader's receive buffer throw
// std::bad_alloc (as a real shortage would).
void fail_receive_buffers_for_test(int count) noexcept;

class Reader : public std::enable_shared_from_this<Reader> {
 public:
  // Owns fd. `session` must outlive the reader's last request; `ended` runs
  // on the reader's loop once it has stopped reading (an error, the end of
  // the connection, or stop()).
  Reader(boost::asio::io_context& ctx, int fd, fuse_session* session, std::shared_ptr<spdlog::logger> log,
         std::function<void()> ended);

  void start() { arm(); }
  // Any thread: closes the descriptor on its loop; the pending read ends.
  void stop();
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
  core::IoBuffer take_buffer() { return std::move(buf_); }

  static thread_local Reader* current;

 private:
  void arm();
  void retry_later() noexcept;
  void on_read(const boost::system::error_code& ec, size_t n);
  void end() noexcept;

  boost::asio::io_context& ctx_;
  boost::asio::posix::stream_descriptor sd_;
  fuse_session* session_;
  std::shared_ptr<spdlog::logger> log_;
  std::function<void()> ended_;
  size_t write_turn_ = 0;
  core::IoBuffer buf_;
  boost::asio::steady_timer retry_;  // waiting for memory for buf_
  bool starved_ = false;             // logged that buf_ could not be allocated
};

}  // namespace blockway::fuse
