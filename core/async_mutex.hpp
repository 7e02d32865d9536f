// AsyncMutex: a FIFO lock for coroutines on any thread; waiting suspends the
// coroutine, never a thread.
//
// Thread model: thread-safe; built on SharedEvent (each holder's release
// wakes the next in line).
#pragma once

#include "core/shared_event.hpp"

#include <memory>
#include <mutex>

namespace blockway::core {

class AsyncMutex {
 public:
  class Guard {
   public:
    explicit Guard(std::shared_ptr<SharedEvent> mine) : mine_(std::move(mine)) {}
    Guard(Guard&&) = default;
    Guard& operator=(Guard&&) = default;
    ~Guard() {
      if (mine_) mine_->set();
    }

   private:
    std::shared_ptr<SharedEvent> mine_;
  };

  Task<Guard> lock() {
    auto mine = std::make_shared<SharedEvent>();
    std::shared_ptr<SharedEvent> previous;
    {
      std::lock_guard l(mutex_);
      previous = std::exchange(tail_, mine);
    }
    if (previous) co_await previous->wait();
    co_return Guard(std::move(mine));
  }

 private:
  std::mutex mutex_;
  std::shared_ptr<SharedEvent> tail_;
};

}  // namespace blockway::core
