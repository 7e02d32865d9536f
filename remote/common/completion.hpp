// Completion: a type-erased, move-only completion handler, for backends that
// park an awaiting coroutine's handler while a C library (libnbd, libiscsi,
// libnfs) or the AoE tag table works on its request. Boost 1.81's
// any_completion_handler recurses forever when moved, so it is not used.
//
// Thread model: none of its own; the owner calls complete() once, on the
// thread where the handler may run (post_completion() posts it there).
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/post.hpp>

#include <memory>
#include <system_error>
#include <utility>

namespace blockway::remote::common {

struct Completion {
  virtual ~Completion() = default;
  virtual void complete(std::error_code ec) = 0;
};

template <class H>
struct CompletionOf final : Completion {
  explicit CompletionOf(H&& h) : handler(std::move(h)) {}
  void complete(std::error_code ec) override { std::move(handler)(ec); }
  H handler;
};

// Completes `done` with errno `err` (0: success) on `ex`, never in the
// caller's frame: a C library's callback must not resume the awaiting
// coroutine while the library is inside its own code (and may hold a lock).
inline void post_completion(const boost::asio::any_io_executor& ex, std::unique_ptr<Completion> done, int err) {
  const std::error_code ec = err ? std::error_code(err, std::system_category()) : std::error_code{};
  boost::asio::post(ex, [done = std::move(done), ec] { done->complete(ec); });
}

}  // namespace blockway::remote::common
