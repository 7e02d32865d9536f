#include "remote/common/command_slots.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace blockway::remote::common {
namespace {

namespace asio = boost::asio;

// One "command": takes its share of the budget and records that it started;
// the test returns the share with release() when it likes. io.poll(), not
// run(): a parked waiter keeps the io_context busy.
struct Command {
  uint64_t bytes;
  bool started = false;
};

core::Task<void> run_command(CommandSlots& slots, Command& c, std::vector<int>& order, int id) {
  co_await slots.acquire(c.bytes);
  c.started = true;
  order.push_back(id);
  co_return;
}

TEST(CommandSlots, AdmitsWithinTheBudgetInOrder) {
  asio::io_context io;
  CommandSlots slots(io.get_executor(), 100);
  std::vector<Command> cmds{{40}, {40}, {40}, {10}, {100}};
  std::vector<int> order;
  for (int i = 0; i < static_cast<int>(cmds.size()); ++i)
    asio::co_spawn(io, run_command(slots, cmds[i], order, i), asio::detached);
  io.poll();
  io.restart();
  // 40 + 40 fit; the third 40 waits, and so does the 10 behind it (FIFO: no
  // overtaking, so a large command is not starved by small ones).
  EXPECT_EQ(order, (std::vector<int>{0, 1}));
  EXPECT_EQ(slots.commands(), 2u);
  EXPECT_EQ(slots.bytes(), 80u);
  EXPECT_EQ(slots.waiting(), 3u);

  slots.release(40);  // command 0 done: 40 + 40 + 10 = 90 fit, 100 does not
  io.poll();
  io.restart();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(slots.bytes(), 90u);
  EXPECT_EQ(slots.waiting(), 1u);

  slots.release(40);
  slots.release(40);
  io.poll();
  io.restart();
  EXPECT_FALSE(cmds[4].started);  // 10 still in flight: 110 > 100
  slots.release(10);
  io.poll();
  io.restart();
  EXPECT_TRUE(cmds[4].started);
  EXPECT_EQ(slots.commands(), 1u);
  slots.release(100);
  EXPECT_EQ(slots.commands(), 0u);
  EXPECT_EQ(slots.bytes(), 0u);
  io.run();  // every coroutine finished: nothing is left waiting
  EXPECT_EQ(slots.waiting(), 0u);
}

TEST(CommandSlots, ACommandLargerThanTheBudgetGoesAlone) {
  asio::io_context io;
  CommandSlots slots(io.get_executor(), 100);
  std::vector<Command> cmds{{500}, {0}, {1}};
  std::vector<int> order;
  for (int i = 0; i < 3; ++i) asio::co_spawn(io, run_command(slots, cmds[i], order, i), asio::detached);
  io.poll();
  io.restart();
  EXPECT_EQ(order, (std::vector<int>{0}));  // admitted with nothing else in flight
  slots.release(500);
  io.poll();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  slots.release(0);
  slots.release(1);
  io.run();
  EXPECT_EQ(slots.commands(), 0u);
}

TEST(CommandSlots, TryAcquireTakesAShareOnlyWhenAcquireWouldNotWait) {
  asio::io_context io;
  CommandSlots slots(io.get_executor(), 100);
  EXPECT_TRUE(slots.try_acquire(60));
  EXPECT_EQ(slots.commands(), 1u);
  EXPECT_EQ(slots.bytes(), 60u);
  EXPECT_FALSE(slots.try_acquire(50));  // 110 > 100: nothing taken
  EXPECT_EQ(slots.commands(), 1u);
  EXPECT_EQ(slots.bytes(), 60u);

  // A waiter queued behind the budget: a small command that would fit must
  // not overtake it (FIFO, as acquire()).
  Command big{80};
  std::vector<int> order;
  asio::co_spawn(io, run_command(slots, big, order, 0), asio::detached);
  io.poll();
  io.restart();
  EXPECT_EQ(slots.waiting(), 1u);
  EXPECT_FALSE(slots.try_acquire(10));
  EXPECT_EQ(slots.bytes(), 60u);

  slots.release(60);  // the waiter goes
  io.poll();
  io.restart();
  EXPECT_TRUE(big.started);
  EXPECT_TRUE(slots.try_acquire(20));  // 80 + 20 fit, nobody waits
  EXPECT_FALSE(slots.try_acquire(1));
  slots.release(80);
  slots.release(20);
  EXPECT_TRUE(slots.try_acquire(500));  // nothing in flight: a large one goes alone
  slots.release(500);
  io.run();
  EXPECT_EQ(slots.commands(), 0u);
  EXPECT_EQ(slots.bytes(), 0u);
}

// inflight-kib=N through the options reader: the budget in bytes, or none.
uint64_t budget_of(const std::string& text) {
  std::map<std::string, std::string> values{{"inflight-kib", text}};
  core::Options options(values);
  return *take_inflight_budget(options);
}

TEST(CommandSlots, TakesTheOption) {
  EXPECT_EQ(budget_of("2048"), 2u << 20);
  EXPECT_EQ(budget_of("1"), 1024u);
  EXPECT_EQ(budget_of("0"), kUnboundedInflight);
  EXPECT_EQ(budget_of("1048576"), 1ull << 30);
  for (const char* bad : {"", "x", "-1", "1.5", "12k", "1048577", "99999999999999999999"}) {
    try {
      (void)budget_of(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const core::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("inflight-kib='") + bad + "'"), std::string::npos) << e.what();
    }
  }
  std::map<std::string, std::string> none;
  core::Options options(none);
  EXPECT_EQ(take_inflight_budget(options), std::nullopt);
}

}  // namespace
}  // namespace blockway::remote::common
