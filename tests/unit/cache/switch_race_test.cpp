// Unit tests for the cache layer's switches (detach, set_mode) and for
// write-back racing foreground writes, over an in-memory remote whose writes
// can be held (gate) or made slow (SlowWrites).
#include "cache/cache_layer.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <thread>

namespace blockway::cache {
namespace {

using core::ByteRange;
using core::PrefetchOrder;
using core::PrefetchState;
using test::Op;
using namespace std::chrono_literals;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 64;
constexpr uint64_t kSize = kChunk * kChunks;  // 4 MiB

// A remote whose writes (and zeroes) take `delay` each: a slow link.
class SlowWrites final : public core::BlockDevice {
 public:
  SlowWrites(std::shared_ptr<test::MemoryDevice> d, std::shared_ptr<std::atomic<int>> delay_ms)
      : d_(std::move(d)), delay_ms_(std::move(delay_ms)) {}
  [[nodiscard]] core::Geometry geometry() const noexcept override { return d_->geometry(); }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return d_->capabilities(); }
  [[nodiscard]] std::string describe() const override { return "slow " + d_->describe(); }
  core::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags f) override {
    return d_->read(b, o, f);
  }
  core::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, core::IoFlags f) override {
    co_await delay();
    co_return co_await d_->write(b, o, f);
  }
  core::Task<std::error_code> flush() override { return d_->flush(); }
  core::Task<std::error_code> trim(ByteRange r, core::IoFlags f) override { return d_->trim(r, f); }
  core::Task<std::error_code> zero(ByteRange r, core::IoFlags f) override {
    co_await delay();
    co_return co_await d_->zero(r, f);
  }
  core::Task<std::error_code> block_status(ByteRange r, core::ExtentList& out) override {
    return d_->block_status(r, out);
  }
  core::Task<std::error_code> prefetch(ByteRange r) override { return d_->prefetch(r); }

 private:
  core::Task<void> delay() {
    const int ms = delay_ms_->load();
    if (ms <= 0) co_return;
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
    timer.expires_after(std::chrono::milliseconds(ms));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
  std::shared_ptr<test::MemoryDevice> d_;
  std::shared_ptr<std::atomic<int>> delay_ms_;
};

using test::bytes;

class SwitchRaceTest : public test::MemoryRemoteLayerTest {
 protected:
  SwitchRaceTest() : MemoryRemoteLayerTest(kChunk, kSize) { writeback_delay_ = 60s; }  // write-back only when a test asks

  CacheLayer& open(WriteMode mode, bool auto_detach = false) {
    auto cfg = config(mode);
    cfg.auto_detach = auto_detach;
    return open_layer(cfg, std::make_unique<SlowWrites>(remote_, delay_ms_), true);
  }
  // Chunk [0, kChunk) dirty with 0xA1, inherited by a writethrough session.
  void open_writethrough_with_dirty_chunk0(bool auto_detach = false) {
    open(WriteMode::writeback);
    ASSERT_FALSE(write(0, bytes(kChunk, 0xA1)));  // whole chunk: dirty, no fetch
    h_->close();
    open(WriteMode::writethrough, auto_detach);
    ASSERT_EQ(layer().report().dirty_bytes, kChunk);
    ASSERT_EQ(remote_->contents(0, kChunk), pattern(0, kChunk));
  }

  // Client traffic while a switch runs: a reader of a present chunk that
  // records its worst latency, and a writer of 4 KiB blocks that keeps the
  // image it expects.
  struct Traffic {
    std::atomic<bool> stop{false};
    std::atomic<int64_t> worst_read_us{0};
    std::atomic<int> reads{0}, writes{0}, errors{0};
    std::vector<std::byte> expected;
    std::thread reader, writer;
  };
  void start_traffic(Traffic& t, uint64_t read_off, uint64_t write_from, uint64_t write_chunks) {
    t.expected = read(0, kSize);
    t.reader = std::thread([this, &t, read_off] {
      std::vector<std::byte> buf(4096);
      while (!t.stop.load()) {
        const auto t0 = std::chrono::steady_clock::now();
        if (h_->run(layer().read(buf, read_off, 0))) ++t.errors;
        const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
        t.worst_read_us.store(std::max<int64_t>(t.worst_read_us.load(), us.count()));
        ++t.reads;
        std::this_thread::sleep_for(2ms);
      }
    });
    t.writer = std::thread([this, &t, write_from, write_chunks] {
      for (uint64_t i = 0; !t.stop.load(); ++i) {
        const uint64_t off = (write_from + i % write_chunks) * kChunk + (i * 4096) % kChunk;
        auto data = bytes(4096, static_cast<uint8_t>(i % 250 + 1));
        if (h_->run(layer().write(data, off, 0))) {
          ++t.errors;
        } else {
          std::copy(data.begin(), data.end(), t.expected.begin() + static_cast<long>(off));
          ++t.writes;
        }
        std::this_thread::sleep_for(5ms);
      }
    });
  }
  static void stop_traffic(Traffic& t) {
    t.stop.store(true);
    t.reader.join();
    t.writer.join();
    std::printf("traffic: %d reads (worst %lld us), %d writes, %d errors\n", t.reads.load(),
                static_cast<long long>(t.worst_read_us.load()), t.writes.load(), t.errors.load());
  }

  std::shared_ptr<std::atomic<int>> delay_ms_ = std::make_shared<std::atomic<int>>(0);
};

// A chunk inherited dirty in writethrough mode. The writethrough
// write reaches the remote while a write-back of the same chunk runs; the
// write-back must not store the chunk's older bytes over it (a lost write
// the cache would then call clean).
TEST_F(SwitchRaceTest, WriteBackNeverStoresOlderBytesOverAWritethroughWrite) {
  open_writethrough_with_dirty_chunk0();
  remote_->close_gate(Op::write);
  const auto fresh = bytes(4096, 0xB2);
  auto wt = boost::asio::co_spawn(h_->io(), layer().write(fresh, 0, 0), boost::asio::use_future);
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::write) == 1; }, 5s));
  // A FLUSH writes back the inherited dirty chunk. Without exclusion its
  // write-back reads the old bytes from the cache file and reaches the gate
  // now, behind the writethrough write.
  auto flush = boost::asio::co_spawn(h_->io(), layer().flush(), boost::asio::use_future);
  (void)test::eventually([&] { return remote_->in_flight(Op::write) == 2; }, 500ms);
  remote_->open_gate(Op::write);
  EXPECT_FALSE(wt.get());
  EXPECT_FALSE(flush.get());
  auto expected = bytes(kChunk, 0xA1);
  std::copy(fresh.begin(), fresh.end(), expected.begin());
  EXPECT_EQ(remote_->contents(0, kChunk), expected) << "the write-back stored stale bytes over a newer write";
  EXPECT_EQ(read(0, kChunk), expected);
  EXPECT_EQ(layer().report().dirty_bytes, 0u);
  h_->close();
}

// A writethrough trim of part of a chunk that is still dirty must not drop
// the chunk (a refetch would replace the rest of its dirty data by the
// remote's older bytes).
TEST_F(SwitchRaceTest, WritethroughTrimKeepsTheRestOfADirtyChunk) {
  open_writethrough_with_dirty_chunk0();
  ASSERT_FALSE(h_->run(layer().trim({0, 4096}, 0)));
  EXPECT_EQ(read(4096, kChunk - 4096), bytes(kChunk - 4096, 0xA1));
  ASSERT_FALSE(h_->run(layer().flush()));
  EXPECT_EQ(layer().report().dirty_bytes, 0u);
  EXPECT_EQ(remote_->contents(4096, kChunk - 4096), bytes(kChunk - 4096, 0xA1));
  // A trim that covers clean chunks still drops them: fetched again.
  const auto reads = remote_->calls(Op::read);
  ASSERT_FALSE(h_->run(layer().trim({kChunk, kChunk}, 0)));
  EXPECT_EQ(read(kChunk, kChunk), bytes(kChunk, 0));  // the memory remote trims to zeroes
  EXPECT_GT(remote_->calls(Op::read), reads);
  h_->close();
}

// Block status in writethrough mode reports an inherited dirty chunk as data,
// even where the remote (which does not have it yet) says hole.
TEST_F(SwitchRaceTest, WritethroughBlockStatusReportsInheritedDirtyChunksAsData) {
  open_writethrough_with_dirty_chunk0();
  const uint32_t hz = core::kExtentHole | core::kExtentZero;
  remote_->set_extents({{kSize, hz}});
  core::ExtentList out;
  ASSERT_FALSE(h_->run(layer().block_status({0, kSize}, out)));
  EXPECT_EQ(out, (core::ExtentList{{kChunk, 0}, {kSize - kChunk, hz}}));
  ASSERT_FALSE(h_->run(layer().flush()));  // written back: the remote's word again
  out.clear();
  ASSERT_FALSE(h_->run(layer().block_status({0, kSize}, out)));
  EXPECT_EQ(out, (core::ExtentList{{kSize, hz}}));
  h_->close();
}

// set_mode to writethrough writes back what is dirty without the
// door closed: clients reading present chunks are never held behind a slow
// remote write, and the switch ends with nothing dirty and nothing lost.
TEST_F(SwitchRaceTest, SetModeToWritethroughNeverParksClientsBehindTheWriteBack) {
  open(WriteMode::writeback);
  (void)read(0, kSize);  // everything present
  ASSERT_FALSE(write(0, bytes(kChunk, 0x5a)));
  delay_ms_->store(400);
  Traffic t;
  start_traffic(t, 40 * kChunk, 2, 8);
  ASSERT_TRUE(test::eventually([&] { return t.writes.load() >= 5; }, 5s));
  const auto r = h_->run(layer().set_mode("writethrough"));
  std::this_thread::sleep_for(100ms);
  stop_traffic(t);
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(t.errors.load(), 0);
  EXPECT_GT(t.reads.load(), 10);
  EXPECT_LT(t.worst_read_us.load(), 200'000) << "a read of a present chunk waited behind a remote write";
  EXPECT_EQ(layer().mode(), WriteMode::writethrough);
  EXPECT_EQ(layer().report().dirty_bytes, 0u);
  delay_ms_->store(0);
  EXPECT_EQ(remote_->contents(0, kSize), t.expected) << "the remote misses writes made before or during the switch";
  EXPECT_EQ(read(0, kSize), t.expected);
  h_->close();
}

// A switch to writethrough whose write-back fails does not happen: the old
// mode stays, with its dirty data, and clients were never held meanwhile.
TEST_F(SwitchRaceTest, SetModeToWritethroughKeepsTheOldModeWhenTheWriteBackFails) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(0, bytes(kChunk, 0x5a)));
  remote_->fail(Op::write, EIO);
  const auto r = h_->run(layer().set_mode("writethrough"));
  EXPECT_EQ(r.ec, std::errc::io_error) << r.message;
  EXPECT_NE(r.message.find("the write mode stays writeback-local"), std::string::npos) << r.message;
  EXPECT_EQ(layer().mode(), WriteMode::writeback_local);
  EXPECT_EQ(layer().report().dirty_bytes, kChunk);
  EXPECT_EQ(store_->find("vm")->mode, "writeback-local");
  // The remote is still away: writes keep working in the old mode.
  ASSERT_FALSE(write(2 * kChunk, bytes(kChunk, 0x5b)));
  remote_->fail(Op::write, 0);
  const auto ok = h_->run(layer().set_mode("writethrough"));
  ASSERT_TRUE(ok.ok()) << ok.message;
  EXPECT_EQ(layer().report().dirty_bytes, 0u);
  EXPECT_EQ(remote_->contents(0, kChunk), bytes(kChunk, 0x5a));
  EXPECT_EQ(remote_->contents(2 * kChunk, kChunk), bytes(kChunk, 0x5b));
  EXPECT_EQ(store_->find("vm")->mode, "writethrough");
  h_->close();
}

// A forced detach while a client keeps dirtying chunks. The door
// closes only to check; each time new dirty data is found it opens again and
// writes back with clients going on; after a bounded number of tries it says
// "busy" (EAGAIN). Switched to writethrough first, the same detach succeeds.
TEST_F(SwitchRaceTest, ForcedDetachUnderAWriterNeverParksClientsAndEndsBusyOrDetached) {
  open(WriteMode::writeback);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(test::eventually([&] { return layer().report().prefetch.state == PrefetchState::done; }, 20s));
  ASSERT_FALSE(write(0, bytes(kChunk, 0x5a)));
  delay_ms_->store(250);
  Traffic t;
  start_traffic(t, 40 * kChunk, 2, 8);
  ASSERT_TRUE(test::eventually([&] { return t.writes.load() >= 5; }, 5s));
  const auto busy = h_->run(layer().detach(true));
  EXPECT_EQ(busy.ec, std::errc::resource_unavailable_try_again) << busy.message;
  EXPECT_NE(busy.message.find("busy"), std::string::npos) << busy.message;
  EXPECT_NE(busy.message.find("try again"), std::string::npos) << busy.message;
  EXPECT_FALSE(layer().detached());
  const int64_t worst_us = t.worst_read_us.load();
  std::printf("worst read while detach was busy: %lld us\n", static_cast<long long>(worst_us));
  EXPECT_LT(worst_us, 150'000) << "a read of a present chunk waited behind a remote write";
  EXPECT_EQ(t.errors.load(), 0);
  // What the message suggests: writethrough first, then nothing new is dirty
  // (the writer's requests now wait on the remote: 100 ms, within what the
  // door waits for requests in flight).
  delay_ms_->store(100);
  const auto wt = h_->run(layer().set_mode("writethrough"));
  ASSERT_TRUE(wt.ok()) << wt.message;
  const auto r = h_->run(layer().detach(true));
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_TRUE(layer().detached());
  std::this_thread::sleep_for(50ms);
  stop_traffic(t);
  EXPECT_EQ(t.errors.load(), 0);
  EXPECT_EQ(read(0, kSize), t.expected);
  h_->close();
  EXPECT_EQ(cache_file(), t.expected);
}

// Chunks that go missing after the prefetch finished (here a
// writethrough trim while auto-detach waits for a write-back) are fetched
// again, and the export still detaches, instead of auto-detach giving up.
TEST_F(SwitchRaceTest, AutoDetachFetchesChunksThatWentMissingAndDetaches) {
  open_writethrough_with_dirty_chunk0(true);
  remote_->close_gate(Op::write);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  // Auto-detach writes back chunk 0 first: held at the gate.
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::write) == 1; }, 10s));
  ASSERT_EQ(layer().report().prefetch.state, PrefetchState::done);
  ASSERT_FALSE(h_->run(layer().trim({5 * kChunk, kChunk}, 0)));  // drops chunk 5
  EXPECT_EQ(layer().report().present_bytes, kSize - kChunk);
  remote_->open_gate(Op::write);
  ASSERT_TRUE(test::eventually([&] { return layer().detached(); }, 15s))
      << "auto-detach gave up: " << layer().report().prefetch.error;
  const auto rep = layer().report();
  EXPECT_EQ(rep.prefetch.state, PrefetchState::done);
  EXPECT_EQ(rep.prefetch.error, "");
  EXPECT_EQ(rep.present_bytes, kSize);
  EXPECT_EQ(remote_->contents(0, kChunk), bytes(kChunk, 0xA1));
  EXPECT_EQ(read(5 * kChunk, kChunk), bytes(kChunk, 0));  // what the remote holds after its trim
  h_->close();
}

// While auto-detach is refused, the status says why.
TEST_F(SwitchRaceTest, AutoDetachShowsWhyItWaitsInTheStatus) {
  open_writethrough_with_dirty_chunk0(true);
  remote_->fail(Op::write, EIO);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(test::eventually(
      [&] { return layer().report().prefetch.error.find("auto-detach waits") != std::string::npos; }, 10s))
      << layer().report().prefetch.error;
  const auto rep = layer().report();
  EXPECT_EQ(rep.prefetch.state, PrefetchState::done);
  EXPECT_NE(rep.prefetch.error.find("write-back to memory://remote failed"), std::string::npos)
      << rep.prefetch.error;
  EXPECT_FALSE(layer().detached());
  remote_->fail(Op::write, 0);
  ASSERT_TRUE(test::eventually([&] { return layer().detached(); }, 10s));
  // The loop clears its reason just after the switch: not at the same instant.
  EXPECT_TRUE(test::eventually([&] { return layer().report().prefetch.error.empty(); }, 5s))
      << layer().report().prefetch.error;
  h_->close();
}

// A prefetch started by command while a finished one's auto-detach waits:
// the old auto-detach loop bows out instead of trying to start a copy of its
// own (EALREADY), which marked the user's running prefetch as failed.
TEST_F(SwitchRaceTest, AutoDetachOfAFinishedRunLeavesANewerRunAlone) {
  open_writethrough_with_dirty_chunk0(true);
  remote_->fail(Op::write, EIO);  // the first run's auto-detach cannot write back: it waits
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(test::eventually(
      [&] { return layer().report().prefetch.error.find("auto-detach waits") != std::string::npos; }, 10s));
  ASSERT_FALSE(h_->run(layer().trim({5 * kChunk, kChunk}, 0)));  // drops chunk 5: it is missing now
  remote_->close_gate(Op::read);  // the new run's fetch of chunk 5 waits
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) == 1; }, 5s));
  remote_->fail(Op::write, 0);  // the old loop's next try would now get as far as "missing"
  // The old loop retries after its back-off (1-2 s); the new run must stay running.
  for (int i = 0; i < 40; ++i) {
    ASSERT_EQ(layer().report().prefetch.state, PrefetchState::running) << layer().report().prefetch.error;
    std::this_thread::sleep_for(100ms);
  }
  remote_->open_gate(Op::read);
  ASSERT_TRUE(test::eventually([&] { return layer().detached(); }, 15s)) << layer().report().prefetch.error;
  EXPECT_EQ(layer().report().prefetch.state, PrefetchState::done);
  h_->close();
}

// A writethrough write stuck at an absent remote is in flight when detach and
// set_mode close the door: they give up on it after a bounded wait, open the
// door again (nobody waits behind it for long), back off, and finally answer
// "busy"; once the remote answers, the same detach succeeds.
TEST_F(SwitchRaceTest, ASwitchDoesNotHoldClientsBehindARequestStuckAtTheRemote) {
  open(WriteMode::writethrough);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(test::eventually([&] { return layer().report().prefetch.state == PrefetchState::done; }, 20s));
  remote_->close_gate(Op::write);
  const auto data = bytes(4096, 0x3c);
  auto stuck = boost::asio::co_spawn(h_->io(), layer().write(data, 9 * kChunk, 0), boost::asio::use_future);
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::write) == 1; }, 5s));
  Traffic t;
  t.expected = read(0, kSize);
  t.reader = std::thread([this, &t] {
    std::vector<std::byte> buf(4096);
    while (!t.stop.load()) {
      const auto t0 = std::chrono::steady_clock::now();
      if (h_->run(layer().read(buf, 40 * kChunk, 0))) ++t.errors;
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
      t.worst_read_us.store(std::max<int64_t>(t.worst_read_us.load(), us.count()));
      ++t.reads;
      std::this_thread::sleep_for(2ms);
    }
  });
  t.writer = std::thread([] {});
  auto detach = boost::asio::co_spawn(h_->io(), layer().detach(false), boost::asio::use_future);
  const bool answered = detach.wait_for(15s) == std::future_status::ready;
  auto mode = boost::asio::co_spawn(h_->io(), layer().set_mode("writeback"), boost::asio::use_future);
  const bool mode_answered = mode.wait_for(15s) == std::future_status::ready;
  remote_->open_gate(Op::write);  // (also unblocks the switch and the reader if they were stuck)
  stop_traffic(t);
  ASSERT_TRUE(answered) << "detach waited for a request stuck at the remote";
  ASSERT_TRUE(mode_answered) << "set_mode waited for a request stuck at the remote";
  const auto r = detach.get();
  EXPECT_EQ(r.ec, std::errc::resource_unavailable_try_again) << r.message;
  EXPECT_NE(r.message.find("requests in flight kept waiting"), std::string::npos) << r.message;
  const auto m = mode.get();
  EXPECT_EQ(m.ec, std::errc::resource_unavailable_try_again) << m.message;
  EXPECT_NE(m.message.find("the write mode stays writethrough"), std::string::npos) << m.message;
  EXPECT_EQ(layer().mode(), WriteMode::writethrough);
  EXPECT_FALSE(layer().detached());
  EXPECT_LT(t.worst_read_us.load(), 600'000) << "a client waited at the door behind the stuck request";
  EXPECT_EQ(t.errors.load(), 0);
  EXPECT_FALSE(stuck.get());
  const auto ok = h_->run(layer().detach(false));
  ASSERT_TRUE(ok.ok()) << ok.message;
  EXPECT_EQ(remote_->contents(9 * kChunk, 4096), data);
  EXPECT_EQ(read(9 * kChunk, 4096), data);
  h_->close();
}

}  // namespace
}  // namespace blockway::cache
