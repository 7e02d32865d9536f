#include "gateway/event_loops.hpp"

#include "gateway/logging.hpp"

namespace blockway::gateway {

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
  std::vector<std::jthread> threads;
  for (size_t i = 1; i < contexts_.size(); ++i)
    threads.emplace_back([this, ctx = contexts_[i].get()] {
      try {
        ctx->run();
      } catch (const std::exception& e) {
        // A bug escaped a coroutine: bring the whole daemon down rather than
        // leave one loop dead and its connections hanging.
        logger("daemon")->critical("event loop failed: {}", e.what());
        for (auto& c : contexts_) c->stop();
      }
    });
  try {
    contexts_[0]->run();
  } catch (...) {
    stop();  // let the other loops' threads end before they are joined
    throw;
  }
}

void EventLoops::release() {
  for (auto& g : guards_) g.reset();
}

void EventLoops::stop() {
  release();
  for (auto& c : contexts_) c->stop();
}

}  // namespace blockway::gateway
