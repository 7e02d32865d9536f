// SharedEvent: a one-shot event that coroutines on any thread can wait for.
//
// Thread model: thread-safe. set() may run on any thread; each waiter
// resumes on its own executor (its handler is posted there).
#pragma once

#include "core/task.hpp"

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/post.hpp>

#include <memory>
#include <mutex>
#include <system_error>
#include <vector>

namespace blockway::core {

class SharedEvent {
 public:
  using Handler = boost::asio::any_completion_handler<void(std::error_code)>;
  struct Waiter {
    boost::asio::any_io_executor executor;  // where the waiter resumes
    Handler handler;
  };

  // Wakes every waiter, now and later, with `ec`. Only the first call counts.
  void set(std::error_code ec = {}) {
    std::vector<Waiter> waiters;
    {
      std::lock_guard lock(mutex_);
      if (done_) return;
      done_ = true;
      result_ = ec;
      waiters.swap(waiters_);
    }
    for (auto& w : waiters)
      boost::asio::post(w.executor, [h = std::move(w.handler), ec]() mutable { std::move(h)(ec); });
  }

  [[nodiscard]] bool is_set() const {
    std::lock_guard lock(mutex_);
    return done_;
  }

  Task<std::error_code> wait() {
    {
      std::lock_guard lock(mutex_);
      if (done_) co_return result_;
    }
    co_return co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
        [this](auto handler) { add_waiter(std::move(handler)); }, boost::asio::use_awaitable);
  }

  // Waits for `*event`, keeping it alive only until the wait is registered.
  // The waiter then does not own the event: if whoever owns it is destroyed
  // without setting it (an event loop torn down mid-flight), the waiter is
  // freed with it, instead of the two keeping each other alive in a
  // reference cycle (event -> waiter's handler -> waiter's frame -> event).
  // Not a coroutine on purpose: a coroutine's frame would hold the argument.
  static Task<std::error_code> wait_unowned(std::shared_ptr<SharedEvent> event) {
    return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
        [](auto handler, std::shared_ptr<SharedEvent> ev) { ev->add_waiter(std::move(handler)); },
        boost::asio::use_awaitable, std::move(event));
  }

 private:
  template <class H>
  void add_waiter(H handler) {
    std::unique_lock lock(mutex_);
    if (done_) {
      const auto ec = result_;
      lock.unlock();
      auto ex = boost::asio::get_associated_executor(handler);
      boost::asio::post(ex, [h = std::move(handler), ec]() mutable { std::move(h)(ec); });
      return;
    }
    boost::asio::any_io_executor ex = boost::asio::get_associated_executor(handler);
    waiters_.push_back({std::move(ex), Handler(std::move(handler))});
  }

  mutable std::mutex mutex_;
  bool done_ = false;
  std::error_code result_;
  std::vector<Waiter> waiters_;
};

}  // namespace blockway::core
