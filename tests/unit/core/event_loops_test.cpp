// EventLoops: one io_context per thread, round robin, release/stop, failures.
#include "core/event_loops.hpp"
#include "core/task.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

namespace blockway::core {
namespace {

// Runs loops.run() with a watchdog that stops the loops after `limit`.
// Returns false if the watchdog had to step in (run() would have hung).
template <class F>
bool run_guarded(EventLoops& loops, F&& run, std::chrono::milliseconds limit = std::chrono::seconds(5)) {
  std::mutex m;
  std::condition_variable cv;
  bool finished = false, fired = false;
  std::thread watchdog([&] {
    std::unique_lock lock(m);
    if (!cv.wait_for(lock, limit, [&] { return finished; })) {
      fired = true;
      loops.stop();
    }
  });
  try {
    run();
  } catch (...) {
    {
      std::lock_guard lock(m);
      finished = true;
    }
    cv.notify_all();
    watchdog.join();
    throw;
  }
  {
    std::lock_guard lock(m);
    finished = true;
  }
  cv.notify_all();
  watchdog.join();
  return !fired;
}

TEST(EventLoops, SizeAndRoundRobin) {
  EventLoops loops(3, 1);
  ASSERT_EQ(loops.size(), 3u);
  EXPECT_EQ(&loops.next(), &loops.at(0));
  EXPECT_EQ(&loops.next(), &loops.at(1));
  EXPECT_EQ(&loops.next(), &loops.at(2));
  EXPECT_EQ(&loops.next(), &loops.at(0));
}

TEST(EventLoops, ZeroMeansOnePerHardwareThread) {
  EventLoops loops(0, 1);
  EXPECT_EQ(loops.size(), std::max(1u, std::thread::hardware_concurrency()));
}

TEST(EventLoops, EachLoopRunsOnItsOwnThreadUntilReleased) {
  EventLoops loops(3, 1);
  std::mutex m;
  std::set<std::thread::id> threads;
  std::atomic<int> ran{0};
  std::thread::id loop0;
  for (size_t i = 0; i < loops.size(); ++i) {
    boost::asio::post(loops.at(i), [&, i] {
      {
        std::lock_guard lock(m);
        threads.insert(std::this_thread::get_id());
        if (i == 0) loop0 = std::this_thread::get_id();
      }
      if (++ran == 3) loops.release();
    });
  }
  EXPECT_TRUE(run_guarded(loops, [&] { loops.run(); })) << "run() did not return after release()";
  EXPECT_EQ(ran.load(), 3);
  EXPECT_EQ(threads.size(), 3u);
  EXPECT_EQ(loop0, std::this_thread::get_id()) << "loop 0 runs on the caller's thread";
}

Task<int> offloaded(boost::asio::thread_pool& pool, std::thread::id* worker, std::thread::id* resumed) {
  const int v = co_await offload(pool, [worker] {
    *worker = std::this_thread::get_id();
    return 42;
  });
  *resumed = std::this_thread::get_id();
  co_return v;
}

TEST(EventLoops, OffloadRunsOnTheBlockingPoolAndResumesOnTheLoop) {
  EventLoops loops(1, 2);
  std::thread::id worker, resumed;
  int result = 0;
  boost::asio::co_spawn(loops.at(0), offloaded(loops.blocking(), &worker, &resumed),
                        [&](std::exception_ptr, int v) {
                          result = v;
                          loops.release();
                        });
  EXPECT_TRUE(run_guarded(loops, [&] { loops.run(); }));
  EXPECT_EQ(result, 42);
  EXPECT_NE(worker, std::this_thread::get_id());
  EXPECT_EQ(resumed, std::this_thread::get_id());
}

TEST(EventLoops, StopEndsRunWithWorkPending) {
  EventLoops loops(2, 1);
  boost::asio::post(loops.at(1), [&] { loops.stop(); });
  EXPECT_TRUE(run_guarded(loops, [&] { loops.run(); }));
}

TEST(EventLoops, ExceptionOnLoopZeroPropagatesAndStopsTheOthers) {
  EventLoops loops(3, 1);
  boost::asio::post(loops.at(0), [] { throw std::runtime_error("boom"); });
  bool in_time = false;
  EXPECT_THROW(in_time = run_guarded(loops, [&] { loops.run(); }), std::runtime_error);
  (void)in_time;
}

TEST(EventLoops, ExceptionOnAnotherLoopStopsEveryLoop) {
  EventLoops loops(3, 1);
  boost::asio::post(loops.at(2), [] { throw std::runtime_error("boom"); });
  bool in_time = false;
  try {
    in_time = run_guarded(loops, [&] { loops.run(); });
  } catch (const std::runtime_error&) {
    in_time = true;  // reporting the failure is fine too
  }
  EXPECT_TRUE(in_time) << "a failed loop left the others running";
}

TEST(EventLoops, ExceptionOnAnotherLoopIsReportedByRun) {
  EventLoops loops(3, 1);
  boost::asio::post(loops.at(2), [] { throw std::runtime_error("boom"); });
  EXPECT_THROW(run_guarded(loops, [&] { loops.run(); }), std::exception);
}

}  // namespace
}  // namespace blockway::core
