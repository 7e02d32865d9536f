#include "core/shared_event.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <memory>
#include <optional>
#include <thread>

namespace blockway::core {
namespace {

struct Owner {
  SharedEvent done;
};

std::shared_ptr<SharedEvent> event_of(const std::shared_ptr<Owner>& o) { return {o, &o->done}; }

// Spawns on io a coroutine that waits for ev by wait_unowned() and stores
// what it wakes with in out.
void spawn_unowned_wait(boost::asio::io_context& io, const std::shared_ptr<SharedEvent>& ev,
                        std::optional<std::error_code>& out) {
  boost::asio::co_spawn(
      io,
      [ev, &out]() -> Task<void> {
        auto waiting = SharedEvent::wait_unowned(ev);
        out = co_await std::move(waiting);
      },
      boost::asio::detached);
}

TEST(SharedEvent, WaitersWakeWithTheFirstResultOnly) {
  boost::asio::io_context io;
  auto ev = std::make_shared<SharedEvent>();
  std::optional<std::error_code> a, b;
  boost::asio::co_spawn(
      io, [&]() -> Task<void> { a = co_await ev->wait(); }, boost::asio::detached);
  spawn_unowned_wait(io, ev, b);
  io.poll();
  EXPECT_FALSE(a || b) << "woke before set()";
  ev->set(std::make_error_code(std::errc::io_error));
  ev->set({});
  io.restart();
  io.poll();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(*a, std::errc::io_error);
  EXPECT_EQ(*b, std::errc::io_error);
  // Waiting after set() returns at once with the same result.
  std::optional<std::error_code> c;
  spawn_unowned_wait(io, ev, c);
  io.restart();
  io.poll();
  ASSERT_TRUE(c);
  EXPECT_EQ(*c, std::errc::io_error);
}

TEST(SharedEvent, WaitUnownedDoesNotKeepTheOwnerAlive) {
  auto io = std::make_unique<boost::asio::io_context>();
  auto owner = std::make_shared<Owner>();
  bool frame_destroyed = false;
  struct Sentinel {
    bool *flag;
    ~Sentinel() { *flag = true; }
  };
  boost::asio::co_spawn(
      *io,
      [&, ev = event_of(owner)]() mutable -> Task<void> {
        Sentinel s{&frame_destroyed};
        auto waiting = SharedEvent::wait_unowned(std::move(ev));
        co_await std::move(waiting);
        ADD_FAILURE() << "resumed although the event was never set";
      },
      boost::asio::detached);
  io->poll();
  EXPECT_EQ(owner.use_count(), 1) << "the waiting coroutine owns the event it waits for";
  EXPECT_FALSE(frame_destroyed);
  // The owner goes away without setting the event: the waiter goes with it
  // (LeakSanitizer would report the cycle otherwise). Asio unwinds a
  // coroutine stack through its executor, hence the poll.
  owner.reset();
  io->restart();
  io->poll();
  EXPECT_TRUE(frame_destroyed);
  io.reset();
}

TEST(SharedEvent, SetFromAnotherThreadResumesOnTheWaitersExecutor) {
  boost::asio::io_context io;
  auto owner = std::make_shared<Owner>();
  std::thread::id resumed_on;
  boost::asio::co_spawn(
      io,
      [&, ev = event_of(owner)]() mutable -> Task<void> {
        auto waiting = SharedEvent::wait_unowned(std::move(ev));
        co_await std::move(waiting);
        resumed_on = std::this_thread::get_id();
      },
      boost::asio::detached);
  io.poll();
  std::thread([&] { owner->done.set(); }).join();
  io.run();
  EXPECT_EQ(resumed_on, std::this_thread::get_id());
}

}  // namespace
}  // namespace blockway::core
