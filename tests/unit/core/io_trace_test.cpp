// IoTrace: the bounded ring (order, drain in parts, drops counted) and the
// records CheckedDevice writes into it while attached, with the cache note.
#include "core/io_trace.hpp"

#include "core/checked_device.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace blockway::core {
namespace {

TEST(IoTrace, KeepsOrderDrainsInPartsAndCountsDrops) {
  IoTrace t(3);
  const auto now = IoTrace::Clock::now() + std::chrono::milliseconds(1);
  for (uint64_t i = 0; i < 5; ++i)
    t.record(now, now + std::chrono::microseconds(i), IoOp::read, i * 4096, 4096, CacheOutcome::none, 0);
  EXPECT_EQ(t.recorded(), 3u);
  EXPECT_EQ(t.dropped(), 2u);
  auto a = t.drain(2);
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0].offset, 0u);
  EXPECT_EQ(a[1].offset, 4096u);
  EXPECT_EQ(a[1].latency_ns, 1000u);
  EXPECT_GE(a[0].start_ns, 1'000'000u);
  t.record(now, now, IoOp::write, 99, 1, CacheOutcome::hit, 5);  // room again: wraps around
  auto b = t.drain(10);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0].offset, 8192u);
  EXPECT_EQ(b[1].op, IoOp::write);
  EXPECT_EQ(b[1].error, 5);
  EXPECT_EQ(b[1].cache, CacheOutcome::hit);
  EXPECT_TRUE(t.drain(10).empty());
}

TEST(IoTrace, ManyThreadsRecordWithoutLoss) {
  IoTrace t(40000);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i)
        t.record(IoTrace::Clock::now(), IoTrace::Clock::now(), IoOp::read, 0, 1, CacheOutcome::none, 0);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(t.recorded(), 40000u);
  EXPECT_EQ(t.dropped(), 0u);
  EXPECT_EQ(t.drain(1u << 20).size(), 40000u);
}

// A layer that says "hit" for offsets below 64 KiB and "miss" above, the way
// the cache layer does: the note is taken before anything suspends.
class NotingLayer final : public Layer {
 public:
  using Layer::Layer;
  Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) override {
    RequestNote* note = take_request_note();
    if (note) note->cache = offset < 65536 ? CacheOutcome::hit : CacheOutcome::miss;
    co_return co_await next().read(buf, offset, flags);
  }
};

TEST(IoTrace, CheckedDeviceRecordsEveryRequestWhileAttached) {
  Capabilities caps;
  caps.flush = Support::native;
  auto mem = std::make_unique<test::MemoryDevice>(Geometry{.size = 1 << 20}, caps);
  CheckedDevice dev(std::make_unique<NotingLayer>(std::move(mem)), false);
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(test::sync_wait(dev.read(buf, 0, 0)));  // before: not traced
  auto trace = std::make_shared<IoTrace>(100);
  dev.attach_trace(trace);
  EXPECT_FALSE(test::sync_wait(dev.read(buf, 4096, 0)));
  EXPECT_FALSE(test::sync_wait(dev.read(buf, 131072, 0)));
  EXPECT_FALSE(test::sync_wait(dev.write(buf, 8192, 0)));
  EXPECT_FALSE(test::sync_wait(dev.flush()));
  EXPECT_EQ(test::sync_wait(dev.read(buf, 1 << 20, 0)), errno_code(EINVAL));
  EXPECT_EQ(current_request_note, nullptr);  // nothing left pointing into a finished request
  dev.detach_trace(trace);
  EXPECT_FALSE(test::sync_wait(dev.read(buf, 0, 0)));  // after: not traced
  const auto r = trace->drain(100);
  ASSERT_EQ(r.size(), 5u);
  EXPECT_EQ(r[0].op, IoOp::read);
  EXPECT_EQ(r[0].offset, 4096u);
  EXPECT_EQ(r[0].cache, CacheOutcome::hit);
  EXPECT_EQ(r[1].cache, CacheOutcome::miss);
  EXPECT_EQ(r[2].op, IoOp::write);
  EXPECT_EQ(r[2].cache, CacheOutcome::none);
  EXPECT_EQ(r[3].op, IoOp::flush);
  EXPECT_EQ(r[4].error, EINVAL);
  EXPECT_EQ(r[4].length, 4096u);
  for (size_t i = 1; i < r.size(); ++i) EXPECT_GE(r[i].start_ns, r[i - 1].start_ns);
  // Latency stats are kept whether traced or not.
  const auto s = dev.stats().snapshot();
  EXPECT_EQ(s.op(IoOp::read).requests, 4u);
  EXPECT_EQ(s.op(IoOp::read).errors, 1u);
  uint64_t observed = 0;
  for (auto n : s.op(IoOp::read).buckets) observed += n;
  EXPECT_EQ(observed, 4u);
}

TEST(IoTrace, DetachingAnOlderTraceKeepsTheNewerOne) {
  Capabilities caps;
  CheckedDevice dev(std::make_unique<test::MemoryDevice>(Geometry{.size = 1 << 20}, caps), false);
  auto first = std::make_shared<IoTrace>(10), second = std::make_shared<IoTrace>(10);
  dev.attach_trace(first);
  dev.attach_trace(second);
  dev.detach_trace(first);
  std::vector<std::byte> buf(512);
  EXPECT_FALSE(test::sync_wait(dev.read(buf, 0, 0)));
  EXPECT_EQ(first->recorded(), 0u);
  EXPECT_EQ(second->recorded(), 1u);
}

TEST(LatencyBucket, BoundsAreInclusiveAndTheLastIsUnbounded) {
  EXPECT_EQ(latency_bucket(0), 0u);
  EXPECT_EQ(latency_bucket(10'000), 0u);
  EXPECT_EQ(latency_bucket(10'001), 1u);
  EXPECT_EQ(latency_bucket(10'000'000'000), kLatencyBucketsNs.size() - 1);
  EXPECT_EQ(latency_bucket(UINT64_MAX), kLatencyBucketsNs.size());
}

}  // namespace
}  // namespace blockway::core
