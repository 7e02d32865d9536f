#include "core/event_loops.hpp"

#include "core/logging.hpp"

#include <exception>
#include <mutex>

namespace blockway::core {

EventLoops::EventLoops(unsigned loops, unsigned blocking_threads)
    : blocking_(blocking_threads == 0 ? 1 : blocking_threads) {
  if (loops == 0) loops = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 0; i < loops; ++i) {
    // concurrency hint 1: each context is run by exactly one thread, which
    // lets Asio drop its internal scheduler locking.
    contexts_.push_back(std::make_unique<boost::asio::io_context>(1));
    guards_.emplace_back(boost::asio::make_work_guard(*contexts_.back()));
  }
}

EventLoops::~EventLoops() {
  stop();
  blocking_.join();
}

boost::asio::io_context& EventLoops::next() {
  return *contexts_[next_.fetch_add(1, std::memory_order_relaxed) % contexts_.size()];
}

void EventLoops::run() {
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto run_one = [&](boost::asio::io_context& ctx) {
    try {
      ctx.run();
    } catch (const std::exception& e) {
      // A bug escaped a coroutine: bring the whole daemon down rather than
      // leave one loop dead and its connections hanging, and report it.
      logger("daemon")->critical("event loop failed: {}", e.what());
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      for (auto& c : contexts_) c->stop();
    }
  };
  {
    std::vector<std::jthread> threads;
    for (size_t i = 1; i < contexts_.size(); ++i) threads.emplace_back([&, i] { run_one(*contexts_[i]); });
    run_one(*contexts_[0]);
  }
  if (failure) std::rethrow_exception(failure);
}

void EventLoops::release() {
  for (auto& g : guards_) g.reset();
}

void EventLoops::stop() {
  release();
  for (auto& c : contexts_) c->stop();
}

}  // namespace blockway::core
