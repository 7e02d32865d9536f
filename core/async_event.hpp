// AsyncEvent: a coroutine waits until another coroutine on the same
// io_context calls notify(). Built on a steady_timer that never expires by
// itself and is cancelled to wake the waiter.
//
// Thread model: single-threaded; waiter and notifier must run on the same
// io_context (one connection's loop).
#pragma once

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "core/task.hpp"

namespace blockway::core {

class AsyncEvent {
 public:
  explicit AsyncEvent(const boost::asio::any_io_executor& ex) : timer_(ex) {}

  // Returns after the next notify() (or at once if one happened since the
  // last wait; notifications do not queue up beyond one).
  Task<void> wait() {
    if (pending_) {
      pending_ = false;
      co_return;
    }
    timer_.expires_at(boost::asio::steady_timer::time_point::max());
    waiting_ = true;
    co_await timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    waiting_ = false;
    pending_ = false;
  }

  void notify() {
    if (waiting_)
      timer_.cancel();
    else
      pending_ = true;
  }

 private:
  boost::asio::steady_timer timer_;
  bool waiting_ = false;
  bool pending_ = false;
};

}  // namespace blockway::core
