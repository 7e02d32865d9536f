// InflightRequests: the requests one remote session has sent and not yet seen
// answered, oldest first, with the one timer that watches the oldest. A
// request with no answer within the I/O timeout means the session hangs; the
// session is then told (`expired`) and drops itself, failing them all.
//
// One timer for the oldest request, not one per request: requests are
// answered roughly in order, so the timer is re-armed once per oldest
// request, not once per request.
//
// Request needs: `typename std::list<Request*>::iterator pos`, `bool linked`,
// `std::chrono::steady_clock::time_point started` (set before link()).
//
// Thread model: the session's event loop only, like the session that holds it.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <list>
#include <memory>

namespace blockway::remote {

template <class Request>
class InflightRequests {
 public:
  using Clock = std::chrono::steady_clock;

  // `expired` runs on the loop when the oldest request has waited `timeout`.
  InflightRequests(boost::asio::io_context& io, std::chrono::milliseconds timeout, std::function<void()> expired)
      : timer_(io), timeout_(timeout), expired_(std::move(expired)) {}

  [[nodiscard]] bool empty() const noexcept { return list_.empty(); }
  [[nodiscard]] size_t size() const noexcept { return list_.size(); }
  [[nodiscard]] Request* oldest() const noexcept { return list_.front(); }
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return timeout_; }

  // Adds r as the newest. `owner` (the session holding this list) is kept
  // alive while the timer waits.
  void link(Request* r, const std::shared_ptr<void>& owner) {
    r->pos = list_.insert(list_.end(), r);
    r->linked = true;
    if (list_.size() == 1) arm(owner);
  }

  // Removes r if it is in the list; the timer stops with the last one.
  void unlink(Request* r) noexcept {
    if (!r->linked) return;
    list_.erase(r->pos);
    r->linked = false;
    if (list_.empty()) stop_timer();
  }

  void stop_timer() noexcept { timer_.cancel(); }

 private:
  void arm(std::shared_ptr<void> owner) {
    timer_.expires_at(list_.front()->started + timeout_);
    timer_.async_wait([this, owner = std::move(owner)](const boost::system::error_code& ec) {
      if (ec || list_.empty()) return;
      if (Clock::now() >= list_.front()->started + timeout_) return expired_();
      arm(owner);  // the oldest was answered meanwhile: watch the next one
    });
  }

  boost::asio::steady_timer timer_;
  std::chrono::milliseconds timeout_;
  std::function<void()> expired_;
  std::list<Request*> list_;  // in issue order: the front is the oldest
};

}  // namespace blockway::remote
