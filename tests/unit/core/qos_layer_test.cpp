// QosLayer over a memory device, on a real event loop and the real clock:
// limits hold (with a tolerance for a loaded machine), requests of one class
// finish in arrival order, a request larger than the burst passes, a limit
// of 0 is none, and a run-time change reaches requests already waiting.
#include "core/options.hpp"
#include "core/qos_layer.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace blockway::core {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::MemoryDevice;
using test::Op;

constexpr uint64_t kSize = 1 << 20;

std::unique_ptr<QosLayer> make_layer(QosLimits limits, MemoryDevice** memory = nullptr) {
  auto dev = std::make_unique<MemoryDevice>(Geometry{kSize, 512, 4096, 32 << 20}, test::native_caps());
  if (memory) *memory = dev.get();
  return std::make_unique<QosLayer>(std::move(dev), limits);
}

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Runs requests concurrently on one io_context thread and records when and
// in which order they finish.
class Runner {
 public:
  explicit Runner(BlockDevice& dev) : dev_(dev) {}

  void read(uint64_t length, int id) { spawn(Kind::read, length, id); }
  void write(uint64_t length, int id) { spawn(Kind::write, length, id); }
  void trim(int id) { spawn(Kind::trim, 4096, id); }
  // Runs until every request finished; returns the seconds it took.
  double run() {
    const auto start = Clock::now();
    io_.run();
    return since(start);
  }
  void run_in_thread() {
    thread_ = std::thread([this] { io_.run(); });
  }
  void join() { thread_.join(); }
  [[nodiscard]] std::vector<int> order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }
  [[nodiscard]] size_t done() const {
    std::lock_guard lock(mutex_);
    return order_.size();
  }

 private:
  enum class Kind { read, write, trim };
  void spawn(Kind kind, uint64_t length, int id) {
    boost::asio::co_spawn(io_, one(kind, length, id), boost::asio::detached);
  }
  Task<void> one(Kind kind, uint64_t length, int id) {
    std::vector<std::byte> buf(length);
    std::error_code ec;
    if (kind == Kind::read) ec = co_await dev_.read(buf, 0, 0);
    else if (kind == Kind::write) ec = co_await dev_.write(buf, 0, 0);
    else ec = co_await dev_.trim({0, length}, 0);
    EXPECT_FALSE(ec) << ec.message();
    std::lock_guard lock(mutex_);
    order_.push_back(id);
  }

  BlockDevice& dev_;
  boost::asio::io_context io_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::vector<int> order_;
};

TEST(QosLayer, ReadIopsLimitHolds) {
  QosLimits q;
  q.read_iops = 200;
  q.burst = 100ms;  // 20 at once
  auto layer = make_layer(q);
  Runner r(*layer);
  for (int i = 0; i < 120; ++i) r.read(4096, i);
  const double took = r.run();
  // 20 from the burst, 100 more at 200/s: 0.5 s.
  EXPECT_GT(took, 0.45);
  EXPECT_LT(took, 0.9);
  const auto s = layer->stats();
  EXPECT_GE(s.read.delayed, 95u);
  EXPECT_LE(s.read.delayed, 100u);
  EXPECT_GT(s.read.delay_seconds, 10.0);  // on average ~0.25 s each
  EXPECT_EQ(s.read.queued, 0u);
  EXPECT_EQ(s.write.delayed, 0u);
}

TEST(QosLayer, WriteBandwidthLimitHoldsAndReadsAreNotLimited) {
  QosLimits q;
  q.write_bps = 4 << 20;  // 4 MiB/s
  q.burst = 100ms;
  auto layer = make_layer(q);
  Runner r(*layer);
  for (int i = 0; i < 32; ++i) r.write(64 << 10, i);  // 2 MiB
  for (int i = 0; i < 200; ++i) r.read(64 << 10, 1000 + i);
  const auto start = Clock::now();
  r.run_in_thread();
  // The reads (another class, not limited) finish long before the writes.
  EXPECT_TRUE(test::eventually([&] { return r.done() >= 200; }, 2000ms));
  r.join();
  const double took = since(start);
  // 2 MiB less the 0.4 MiB burst at 4 MiB/s: 0.4 s.
  EXPECT_GT(took, 0.35);
  EXPECT_LT(took, 0.8);
  EXPECT_EQ(layer->stats().read.delayed, 0u);
}

TEST(QosLayer, TrimAndZeroCountAsOneWriteOperationWithoutBytes) {
  QosLimits q;
  q.write_iops = 1000;
  q.write_bps = 4096;  // a trim of 1 MiB would take 256 s if its length counted
  q.burst = 10ms;
  auto layer = make_layer(q);
  Runner r(*layer);
  for (int i = 0; i < 50; ++i) r.trim(i);
  const double took = r.run();
  EXPECT_GT(took, 0.03);  // 50 operations at 1000/s, 10 from the burst
  EXPECT_LT(took, 0.5);
}

// Reads limited to `bps` bytes per second with `burst`.
QosLimits read_bps(uint64_t bps, std::chrono::milliseconds burst) {
  QosLimits q;
  q.read_bps = bps;
  q.burst = burst;
  return q;
}

TEST(QosLayer, RequestsOfOneClassFinishInArrivalOrder) {
  auto layer = make_layer(read_bps(1 << 20, 64ms));  // 1 MiB/s, burst 64 KiB
  Runner r(*layer);
  // A large request first, then small ones: none of them overtakes it, and
  // it is not starved by them.
  r.read(64 << 10, 0);
  r.read(256 << 10, 1);
  for (int i = 2; i < 12; ++i) r.read(4096, i);
  r.run();
  std::vector<int> want;
  for (int i = 0; i < 12; ++i) want.push_back(i);
  EXPECT_EQ(r.order(), want);
}

TEST(QosLayer, ARequestLargerThanTheBurstPasses) {
  auto layer = make_layer(read_bps(1 << 20, 100ms));  // 1 MiB/s, burst 0.1 MiB
  Runner r(*layer);
  r.read(1 << 20, 0);  // 10 bursts' worth: it goes at once, on a full bucket
  EXPECT_LT(r.run(), 0.3);
  // ... and the next request repays its debt (~0.9 s): it is still waiting
  // after a while, and the queue shows it.
  Runner after(*layer);
  after.read(4096, 1);
  after.run_in_thread();
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(after.done(), 0u);
  EXPECT_EQ(layer->stats().read.queued, 1u);
  layer->set_limits({});  // lift it, so the test ends
  EXPECT_TRUE(test::eventually([&] { return after.done() == 1; }, 1000ms));
  after.join();
}

TEST(QosLayer, ZeroLimitsAreNone) {
  auto layer = make_layer(QosLimits{});
  Runner r(*layer);
  for (int i = 0; i < 2000; ++i) r.read(4096, i);
  for (int i = 0; i < 2000; ++i) r.write(4096, i);
  EXPECT_LT(r.run(), 1.0);
  const auto s = layer->stats();
  EXPECT_EQ(s.read.delayed + s.write.delayed, 0u);
}

TEST(QosLayer, ARunTimeChangeReachesWaitingRequests) {
  QosLimits q;
  q.write_iops = 1;  // one a second: 10 writes would take 9 s
  q.burst = 10ms;
  auto layer = make_layer(q);
  Runner r(*layer);
  for (int i = 0; i < 10; ++i) r.write(4096, i);
  r.run_in_thread();
  EXPECT_TRUE(test::eventually([&] { return layer->stats().write.queued == 9; }, 1000ms));
  EXPECT_EQ(r.done(), 1u);
  // Raised to 100/s: the nine waiting finish in ~0.1 s, in their order.
  const auto change = Clock::now();
  q.write_iops = 100;
  layer->set_limits(q);
  EXPECT_TRUE(test::eventually([&] { return r.done() == 10; }, 2000ms));
  EXPECT_LT(since(change), 0.6);
  r.join();
  std::vector<int> want;
  for (int i = 0; i < 10; ++i) want.push_back(i);
  EXPECT_EQ(r.order(), want);
  EXPECT_EQ(layer->limits().write_iops, 100u);
}

TEST(QosLayer, LoweringTheLimitSlowsWaitingRequests) {
  QosLimits q;
  q.read_iops = 100;
  q.burst = 10ms;
  auto layer = make_layer(q);
  Runner r(*layer);
  for (int i = 0; i < 20; ++i) r.read(4096, i);
  r.run_in_thread();
  q.read_iops = 5;  // the rest now take ~4 s
  layer->set_limits(q);
  std::this_thread::sleep_for(500ms);
  EXPECT_LT(r.done(), 8u);
  layer->set_limits({});
  EXPECT_TRUE(test::eventually([&] { return r.done() == 20; }, 1000ms));
  r.join();
}

TEST(QosLimits, OptionsParseAndRoundTrip) {
  std::map<std::string, std::string> values{{"qos-read-iops", "500"},
                                            {"qos-write-bps", "10M"},
                                            {"qos-burst", "0.5"}};
  Options o(values, "export 'vm1'");
  const auto q = QosLimits::take_from(o);
  EXPECT_TRUE(o.empty());
  EXPECT_EQ(q.read_iops, 500u);
  EXPECT_EQ(q.write_bps, 10u << 20);
  EXPECT_EQ(q.burst, 500ms);
  EXPECT_EQ(QosLimits::from_options(q.to_options(), "saved"), q);
  EXPECT_EQ(test::what_of<ConfigError>([] { (void)QosLimits::from_options("qos-read-iops=1,bogus=2", "saved"); }),
            "saved: unknown option 'bogus' (known: qos-read-iops, qos-write-iops, qos-read-bps, qos-write-bps, "
            "qos-burst)");
}

TEST(QosLimits, BadValuesAreRefusedByName) {
  auto error = [](std::string key, std::string value) {
    std::map<std::string, std::string> values{{key, value}};
    Options o(values, "export 'vm1'");
    return test::what_of<ConfigError>([&] { (void)QosLimits::take_from(o); });
  };
  EXPECT_EQ(error("qos-read-iops", "-5"), "export 'vm1': option qos-read-iops='-5': expected a number from 0 to 4294967295");
  EXPECT_NE(error("qos-write-bps", "10X").find("option qos-write-bps='10X': expected a size"), std::string::npos);
  EXPECT_NE(error("qos-burst", "0").find("option qos-burst='0': expected seconds from 0.01 to 3600"), std::string::npos);
  EXPECT_NE(error("qos-read-iops", "lots").find("qos-read-iops='lots'"), std::string::npos);
}

}  // namespace
}  // namespace blockway::core
