// EventLoops: the daemon's threads.
//
// Thread model: one io_context per event-loop thread (default: one per core).
// A connection lives on exactly one io_context for its whole life, so its
// session state needs no locks. Work that may block a thread runs on a
// separate blocking pool (see offload() in task.hpp) and resumes on the
// connection's io_context.
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include <atomic>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

namespace blockway::core {

class EventLoops {
 public:
  // loops == 0 means one per hardware thread.
  EventLoops(unsigned loops, unsigned blocking_threads);
  ~EventLoops();
  EventLoops(const EventLoops&) = delete;
  EventLoops& operator=(const EventLoops&) = delete;

  [[nodiscard]] size_t size() const noexcept { return contexts_.size(); }
  [[nodiscard]] boost::asio::io_context& at(size_t i) { return *contexts_[i]; }
  // Round-robin choice for a new connection.
  [[nodiscard]] boost::asio::io_context& next();
  [[nodiscard]] boost::asio::thread_pool& blocking() { return blocking_; }

  // Runs every loop (loop 0 on the calling thread) until all of them have no
  // work left after release() or are stopped.
  void run();
  // Lets the loops return once their remaining work is done.
  void release();
  // Stops every loop at once.
  void stop();

 private:
  using Guard = boost::asio::executor_work_guard<boost::asio::io_context::executor_type>;
  std::vector<std::unique_ptr<boost::asio::io_context>> contexts_;
  std::vector<std::optional<Guard>> guards_;
  boost::asio::thread_pool blocking_;
  std::atomic<size_t> next_{0};
};

}  // namespace blockway::core
