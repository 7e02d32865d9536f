// CommandSlots: bounds how many commands one remote session has in flight;
// the others wait their turn in FIFO order.
//
// Why: a client such as nbdcopy keeps hundreds of requests in flight (4
// connections x 64 x 256 KiB = 64 MiB). Passed straight on, every one of them
// holds a buffer at the server and in the daemon at once, far more than the
// CPU caches, so each copy on the way (server read, server send, our receive,
// our send) runs from memory; the server also juggles more threads and
// buffers. A few commands per session keep the pipe full on loopback and on a
// LAN, and the data still warm between the copies.
//
// Measured (nbdcopy --requests=64 --connections=4 reading 1 GiB from tgt,
// shared 2-core machine, medians of 5): with 2 MiB per session instead of no
// bound, tgtd + blockwayd + nbdcopy took 3-10% fewer cycles per GB and
// blockwayd itself up to 15% fewer. Against ganesha the sign changed from run
// to run, so NFS sessions have no bound by default. A link with a long round
// trip needs a larger budget: each session moves at most budget / RTT (the
// backends' option `inflight-kib`, 0 for no bound).
//
// Thread model: single-threaded, on the owning session's io_context; acquire()
// and release() are called there only.
#pragma once

#include "core/options.hpp"
#include "core/task.hpp"
#include "remote/common/completion.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>

namespace blockway::remote::common {

// The default budget per session, and the option that changes it.
inline constexpr uint64_t kDefaultInflightBytes = 2u << 20;
inline constexpr uint64_t kMaxInflightKib = 1u << 20;  // 1 GiB
inline constexpr uint64_t kUnboundedInflight = ~uint64_t{0} >> 1;

// `inflight-kib=N`: N KiB per session, 0 for no bound.
inline constexpr core::OptionSpec kInflightKibOption{
    .name = "inflight-kib",
    .kind = core::OptionKind::number,
    .help = "data in flight per session, in KiB (0: no bound)",
    .min = 0,
    .max = kMaxInflightKib,
    .value = "KIB",
    .unit = "KiB"};

// Takes inflight-kib from an export's options: the budget in bytes per
// session (kUnboundedInflight for 0), or nullopt when it is not given.
inline std::optional<uint64_t> take_inflight_budget(core::Options& options) {
  const auto kib = options.number(kInflightKibOption);
  if (!kib) return std::nullopt;
  return *kib == 0 ? kUnboundedInflight : *kib << 10;
}

class CommandSlots {
 public:
  CommandSlots(boost::asio::any_io_executor ex, uint64_t budget) : ex_(std::move(ex)), budget_(budget) {}
  CommandSlots(const CommandSlots&) = delete;
  CommandSlots& operator=(const CommandSlots&) = delete;

  // Returns once the caller may send a command moving `bytes` of data: at
  // once while they fit in the budget next to those in flight and nobody
  // waits before it, or when nothing is in flight (a command larger than
  // the budget goes alone). Every acquire(n) is paired with one release(n).
  core::Task<void> acquire(uint64_t bytes) {
    if (try_acquire(bytes)) co_return;
    (void)co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
        [this, bytes](auto handler) {
          waiters_.push_back({bytes, std::make_unique<CompletionOf<decltype(handler)>>(std::move(handler))});
        },
        boost::asio::use_awaitable);
  }

  // acquire() without waiting: true (and the share taken) when it would
  // return at once. Lets the common case skip acquire()'s coroutine frame
  // (a malloc and a free per command): `if (!try_acquire(n)) co_await acquire(n);`
  bool try_acquire(uint64_t bytes) noexcept {
    if (!waiters_.empty() || !fits(bytes)) return false;
    ++commands_;
    bytes_ += bytes;
    return true;
  }

  // Returns the command's share and lets the waiters that now fit go, in
  // order (resumed from the loop, not from inside the caller).
  void release(uint64_t bytes) {
    --commands_;
    bytes_ -= bytes;
    while (!waiters_.empty() && fits(waiters_.front().bytes)) {
      Waiter w = std::move(waiters_.front());
      waiters_.pop_front();
      ++commands_;
      bytes_ += w.bytes;
      boost::asio::post(ex_, [done = std::move(w.done)] { done->complete({}); });
    }
  }

  [[nodiscard]] uint64_t commands() const noexcept { return commands_; }
  [[nodiscard]] uint64_t bytes() const noexcept { return bytes_; }
  [[nodiscard]] size_t waiting() const noexcept { return waiters_.size(); }

 private:
  struct Waiter {
    uint64_t bytes;
    std::unique_ptr<Completion> done;
  };
  [[nodiscard]] bool fits(uint64_t bytes) const noexcept { return commands_ == 0 || bytes_ + bytes <= budget_; }

  boost::asio::any_io_executor ex_;
  uint64_t budget_;
  uint64_t commands_ = 0;
  uint64_t bytes_ = 0;
  std::deque<Waiter> waiters_;
};

}  // namespace blockway::remote::common
