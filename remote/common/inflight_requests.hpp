// InflightRequests: the requests one remote session has sent and not yet seen
// answered, oldest first, with the one timer that watches the oldest. A
// request with no answer within the I/O timeout means the session hangs; the
// session is then told (`expired`) and drops itself, failing them all.
//
// One timer for the oldest request, not one per request: requests are
// answered roughly in order, so the timer is re-armed once per oldest
// request, not once per request. The list is intrusive (a request derives
// from InflightRequest, usually through SessionRequest), so linking one
// allocates nothing.
//
// The list does not own its requests: the library or the session does, and
// unlinks a request before it goes.
//
// Thread model: the session's event loop only, like the session that holds it.
#pragma once

#include "remote/common/completion.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/intrusive/list.hpp>

#include <chrono>
#include <functional>
#include <memory>

namespace blockway::remote::common {

// What a request needs to be in an InflightRequests list.
struct InflightRequest : boost::intrusive::list_base_hook<> {
  std::chrono::steady_clock::time_point started;  // set before link()
};

// A session's request that an awaiting coroutine waits for: where to resume
// it and with what. complete() once, from the session's loop.
struct SessionRequest : InflightRequest {
  boost::asio::any_io_executor executor;  // the awaiting coroutine's
  std::unique_ptr<Completion> handler;
  bool done = false;  // complete() ran (or the request was abandoned)

  // Sets where and with what the request completes, and its start time.
  template <class H>
  void begin(boost::asio::any_io_executor ex, H h) {
    executor = std::move(ex);
    handler = std::make_unique<CompletionOf<H>>(std::move(h));
    started = std::chrono::steady_clock::now();
  }
  void complete(int err) {
    done = true;
    post_completion(executor, std::move(handler), err);
  }
};

template <class Request>
class InflightRequests {
 public:
  using Clock = std::chrono::steady_clock;

  // `expired` runs on the loop when the oldest request has waited `timeout`.
  InflightRequests(boost::asio::io_context& io, std::chrono::milliseconds timeout, std::function<void()> expired)
      : timer_(io), timeout_(timeout), expired_(std::move(expired)) {}
  ~InflightRequests() { list_.clear(); }
  InflightRequests(const InflightRequests&) = delete;
  InflightRequests& operator=(const InflightRequests&) = delete;

  [[nodiscard]] bool empty() const noexcept { return list_.empty(); }
  [[nodiscard]] size_t size() const noexcept { return list_.size(); }
  [[nodiscard]] Request* oldest() noexcept { return &list_.front(); }
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return timeout_; }

  // Adds r as the newest. `owner` (the session holding this list) is kept
  // alive while the timer waits.
  void link(Request* r, const std::shared_ptr<void>& owner) {
    list_.push_back(*r);
    if (list_.size() == 1) arm(owner);
  }

  // Removes r if it is in the list; the timer stops with the last one.
  void unlink(Request* r) noexcept {
    if (!r->is_linked()) return;
    list_.erase(list_.iterator_to(*r));
    if (list_.empty()) stop_timer();
  }

  void stop_timer() noexcept { timer_.cancel(); }

 private:
  void arm(std::shared_ptr<void> owner) {
    timer_.expires_at(list_.front().started + timeout_);
    timer_.async_wait([this, owner = std::move(owner)](const boost::system::error_code& ec) {
      if (ec || list_.empty()) return;
      if (Clock::now() >= list_.front().started + timeout_) return expired_();
      arm(owner);  // the oldest was answered meanwhile: watch the next one
    });
  }

  boost::asio::steady_timer timer_;
  std::chrono::milliseconds timeout_;
  std::function<void()> expired_;
  boost::intrusive::list<Request, boost::intrusive::constant_time_size<true>> list_;  // the front is the oldest
};

}  // namespace blockway::remote::common
