#include "fuse/reader.hpp"

#include "fuse/libfuse.hpp"

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <new>

namespace blockway::fuse {

namespace {

// One request: header page + payload (the kernel wants room for max_write + 80).
constexpr size_t kReceiveBuffer = kMaxIo + 4096;
// The kernel's request header (struct fuse_in_header); anything shorter is not a request.
constexpr size_t kRequestHeader = 40;
// A reader that cannot get a receive buffer (no memory) tries again after this.
constexpr auto kReceiveRetry = std::chrono::milliseconds(50);

// Test hook: receive-buffer allocations still to fail (fail_receive_buffers_for_test).
std::atomic<int> receive_failures_to_inject{0};

core::IoBuffer new_receive_buffer() {
  if (receive_failures_to_inject.load(std::memory_order_relaxed) > 0 &&
      receive_failures_to_inject.fetch_sub(1, std::memory_order_relaxed) > 0)
    throw std::bad_alloc();
  return core::IoBuffer(kReceiveBuffer);
}

}  // namespace

void fail_receive_buffers_for_test(int count) noexcept {
  receive_failures_to_inject.store(count, std::memory_order_relaxed);
}

thread_local Reader* Reader::current = nullptr;

Reader::Reader(boost::asio::io_context& ctx, int fd, fuse_session* session, std::shared_ptr<spdlog::logger> log,
               std::function<void()> ended)
    : ctx_(ctx), sd_(ctx, fd), session_(session), log_(std::move(log)), ended_(std::move(ended)), retry_(ctx) {}

void Reader::stop() {
  boost::asio::post(sd_.get_executor(), [self = shared_from_this()] {
    boost::system::error_code ignored;
    self->sd_.close(ignored);
  });
}

void Reader::end() noexcept {
  boost::system::error_code ignored;
  sd_.close(ignored);
  ended_();
}

void Reader::arm() {
  if (buf_.empty()) {
    // A write handler took the last buffer. Without memory for a new one,
    // wait and try again: an exception out of this handler would end the
    // loop's run().
    try {
      buf_ = new_receive_buffer();
    } catch (const std::bad_alloc&) {
      // Stopped meanwhile: end now, or unmount would wait for memory.
      if (!sd_.is_open()) return ended_();
      return retry_later();
    }
    if (starved_) {
      starved_ = false;
      log_->info("FUSE: receive buffer allocated again; reading /dev/fuse");
    }
  }
  sd_.async_read_some(boost::asio::buffer(buf_.data(), buf_.size()),
                      [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                        self->on_read(ec, n);
                      });
}

// Called from a handler: nothing may throw out of it.
void Reader::retry_later() noexcept {
  try {
    if (!starved_) {  // once per shortage, not every kReceiveRetry
      starved_ = true;
      log_->error("FUSE: no memory for a {} KiB receive buffer; reading /dev/fuse again every {} ms",
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
    end();  // not even a timer: this reader ends (the others, if any, go on)
  }
}

void Reader::on_read(const boost::system::error_code& ec, size_t n) {
  if (ec) {
    // ENOENT: the request was interrupted before we read it.
    if (ec.value() == ENOENT || ec.value() == EINTR || ec.value() == EAGAIN) return arm();
    if (ec != boost::asio::error::operation_aborted && ec.value() != ENODEV &&
        ec != boost::asio::error::bad_descriptor)
      log_->warn("reading /dev/fuse: {}", ec.message());
    end();
    return;
  }
  if (n >= kRequestHeader) {
    fuse_buf fb{};
    fb.size = n;
    fb.mem = buf_.data();
    current = this;
    fuse_session_process_buf(session_, &fb);
    current = nullptr;
  }
  arm();
}

}  // namespace blockway::fuse
