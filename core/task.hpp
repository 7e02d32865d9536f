// Task<T>: the one asynchronous model of blockway.
//
// Every operation on the data path is a C++20 coroutine on a Boost.Asio
// executor. A Task runs on the executor of whoever awaits it; work that would
// block a thread (fdatasync, fallocate, a read that misses the page cache) is
// moved to the blocking pool with offload() and resumes on the caller's
// executor afterwards.
#pragma once

#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <type_traits>
#include <utility>

namespace blockway::core {

template <class T = void>
using Task = boost::asio::awaitable<T>;

// Runs f() on `pool` and resumes the awaiting coroutine on its own executor
// with f's result. f must not throw; R must be copy- or move-constructible.
template <class F>
auto offload(boost::asio::thread_pool& pool, F f) {
  using R = std::invoke_result_t<F&>;
  return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(R)>(
      [&pool](auto handler, F fn) {
        auto work = boost::asio::make_work_guard(handler);
        boost::asio::post(pool, [h = std::move(handler), fn = std::move(fn),
                                 work = std::move(work)]() mutable {
          R result = fn();
          auto ex = work.get_executor();
          boost::asio::dispatch(ex, [h = std::move(h), result = std::move(result)]() mutable {
            std::move(h)(std::move(result));
          });
        });
      },
      boost::asio::use_awaitable, std::move(f));
}

}  // namespace blockway::core
