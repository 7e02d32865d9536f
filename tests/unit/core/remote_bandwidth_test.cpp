// RemoteBandwidth and its layer on real event loops and the real clock: the
// cap holds for both classes together, client requests and background
// (prefetch) requests both get served in about their 3:1 shares while both
// wait, either alone gets the whole cap, and kBackground is not passed on.
#include "core/remote_bandwidth.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace blockway::core {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Two event loops, like the daemon's: the pump on the first, requests on both.
struct Loops {
  boost::asio::io_context a, b;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> ga{a.get_executor()},
      gb{b.get_executor()};
  std::thread ta{[this] { a.run(); }}, tb{[this] { b.run(); }};
  ~Loops() {
    ga.reset();
    gb.reset();
    ta.join();
    tb.join();
  }
};

// Keeps `depth` requests of `bytes` in flight in class c until `stop`; counts bytes.
Task<void> stream(std::shared_ptr<RemoteBandwidth> cap, RemoteBandwidth::Class c, uint64_t bytes,
                  std::atomic<bool>& stop, std::atomic<uint64_t>& served) {
  while (!stop.load()) {
    co_await cap->acquire(bytes, c);
    served.fetch_add(bytes);
  }
}

Task<void> read_write_read(BlockDevice& dev) {
  std::vector<std::byte> buf(256 << 10);
  EXPECT_FALSE(co_await dev.read(buf, 0, kBackground));
  EXPECT_FALSE(co_await dev.write(buf, 0, 0));
  EXPECT_FALSE(co_await dev.read(buf, 0, 0));
}

Task<void> acquire_many(std::shared_ptr<RemoteBandwidth> cap, int n) {
  for (int i = 0; i < n; ++i) co_await cap->acquire(1 << 20, RemoteBandwidth::client);
}

TEST(RemoteBandwidth, BothClassesServedInSharesWithinTheCap) {
  Loops loops;
  auto cap = std::make_shared<RemoteBandwidth>(8 << 20, loops.a.get_executor());  // 8 MiB/s
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> client{0}, background{0};
  for (int i = 0; i < 4; ++i) {
    boost::asio::co_spawn(loops.a, stream(cap, RemoteBandwidth::client, 64 << 10, stop, client), boost::asio::detached);
    boost::asio::co_spawn(loops.b, stream(cap, RemoteBandwidth::background, 256 << 10, stop, background),
                          boost::asio::detached);
  }
  std::this_thread::sleep_for(300ms);  // past the initial bucket
  const uint64_t c0 = client, b0 = background;
  std::this_thread::sleep_for(2s);
  const double c = static_cast<double>(client - c0) / 2, b = static_cast<double>(background - b0) / 2;
  stop = true;
  const double total = c + b;
  EXPECT_GT(total, 0.85 * (8 << 20));
  EXPECT_LT(total, 1.15 * (8 << 20));
  // 3:1 while both wait: the client class ~6 MiB/s, prefetch ~2 MiB/s.
  EXPECT_GT(b, 0.15 * total) << "prefetch starved";
  EXPECT_LT(b, 0.35 * total);
  EXPECT_GT(c, 0.65 * total);
  const auto s = cap->stats();
  EXPECT_GT(s.delayed[0], 0u);
  EXPECT_GT(s.delayed[1], 0u);
  EXPECT_TRUE(test::eventually([&] { return cap->stats().queued[0] + cap->stats().queued[1] == 0; }, 2000ms));
}

TEST(RemoteBandwidth, OneClassAloneGetsTheWholeCap) {
  Loops loops;
  auto cap = std::make_shared<RemoteBandwidth>(4 << 20, loops.a.get_executor());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> background{0};
  for (int i = 0; i < 4; ++i)
    boost::asio::co_spawn(loops.b, stream(cap, RemoteBandwidth::background, 128 << 10, stop, background),
                          boost::asio::detached);
  std::this_thread::sleep_for(200ms);
  const uint64_t b0 = background;
  std::this_thread::sleep_for(1500ms);
  const double rate = static_cast<double>(background - b0) / 1.5;
  stop = true;
  EXPECT_GT(rate, 0.85 * (4 << 20));
  EXPECT_LT(rate, 1.15 * (4 << 20));
  EXPECT_TRUE(test::eventually([&] { return cap->stats().queued[1] == 0; }, 2000ms));
}

TEST(RemoteBandwidth, RunTimeChangeAppliesToWaitingRequestsAtOnce) {
  Loops loops;
  auto cap = std::make_shared<RemoteBandwidth>(1 << 20, loops.a.get_executor());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> client{0};
  for (int i = 0; i < 4; ++i)
    boost::asio::co_spawn(loops.b, stream(cap, RemoteBandwidth::client, 64 << 10, stop, client), boost::asio::detached);
  auto rate_over = [&](std::chrono::milliseconds span) {
    const uint64_t c0 = client;
    std::this_thread::sleep_for(span);
    return static_cast<double>(client - c0) / std::chrono::duration<double>(span).count();
  };
  std::this_thread::sleep_for(200ms);
  const double slow = rate_over(1000ms);
  EXPECT_GT(slow, 0.85 * (1 << 20));
  EXPECT_LT(slow, 1.15 * (1 << 20));
  // Raised: the requests already waiting go under the new cap.
  cap->set_rate(8 << 20);
  EXPECT_EQ(cap->rate(), 8u << 20);
  EXPECT_EQ(cap->stats().rate, 8u << 20);
  std::this_thread::sleep_for(200ms);
  const double fast = rate_over(1000ms);
  EXPECT_GT(fast, 0.85 * (8 << 20));
  EXPECT_LT(fast, 1.15 * (8 << 20));
  // Lifted (0): nothing waits any more.
  cap->set_rate(0);
  EXPECT_TRUE(test::eventually([&] { return client > 0 && cap->stats().queued[0] == 0; }, 2000ms));
  EXPECT_GT(rate_over(300ms), 50.0 * (1 << 20));
  stop = true;
}

TEST(RemoteBandwidthLayer, ChargesClientReadsAndWritesNotPrefetchReads) {
  boost::asio::io_context io;
  auto cap = std::make_shared<RemoteBandwidth>(1 << 20, io.get_executor());
  auto mem = std::make_unique<test::MemoryDevice>(Geometry{1 << 20, 512, 4096, 1 << 20}, test::native_caps());
  auto* memory = mem.get();
  RemoteBandwidthLayer layer(std::move(mem), cap);
  const auto start = Clock::now();
  boost::asio::co_spawn(io, read_write_read(layer), boost::asio::detached);
  io.run();
  // 512 KiB at 1 MiB/s, less the 0.1 MiB bucket: ~0.4 s (the prefetch's
  // read took its budget before: not charged here).
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_GT(took, 0.3);
  EXPECT_LT(took, 0.9);
  const auto s = cap->stats();
  EXPECT_EQ(s.bytes[RemoteBandwidth::background], 0u);
  EXPECT_EQ(s.bytes[RemoteBandwidth::client], 512u << 10);
  for (const auto& call : memory->log_of(test::Op::read)) EXPECT_EQ(call.flags, 0u);
}

TEST(RemoteBandwidth, NoCapIsNoWait) {
  boost::asio::io_context io;
  auto cap = std::make_shared<RemoteBandwidth>(0, io.get_executor());
  const auto start = Clock::now();
  boost::asio::co_spawn(io, acquire_many(cap, 1000), boost::asio::detached);
  io.run();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 0.5);
}

}  // namespace
}  // namespace blockway::core
