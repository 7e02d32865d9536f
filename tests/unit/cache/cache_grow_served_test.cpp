// Unit tests for CacheLayer::grow_while_served (cache/cache_grow.cpp): the
// remote grows under a served cache, which grows in place. Data present and
// dirty before the grow stays; the new space is fetched from the remote and
// takes writes like any other (dirty in the write-back modes); a crash after
// the grow keeps what was flushed before and after it; requests on other
// threads, the background loop and a prefetch run on while it grows; what
// cannot grow in place is refused with the reason.
//
// Thread model: as memory_remote_fixture.hpp; the concurrency test adds a
// second io_context with two threads that send requests while the test
// thread grows the layer on the harness's loop.
#include "cache/cache_layer.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <future>
#include <random>
#include <string>
#include <thread>

namespace blockway::cache {
namespace {

using test::bytes;
using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 16;
constexpr uint64_t kSize = kChunk * kChunks;

class CacheGrowServedBase : public test::MemoryRemoteLayerTest {
 protected:
  CacheGrowServedBase() : MemoryRemoteLayerTest(kChunk, kSize) {}

  CacheLayer& open(WriteMode mode) { return open_layer(config(mode), nullptr, false); }
  std::error_code flush() { return h_->run(layer().flush()); }
  std::string cache_path() const { return dir_.str() + "/cache/vm.img"; }
  // The remote grows, then the layer: what the daemon's resize handler does.
  std::string grow(uint64_t size) {
    remote_->grow(size);
    return h_->run(layer().grow_while_served(size));
  }
};

class CacheGrowServedTest : public CacheGrowServedBase, public ::testing::WithParamInterface<WriteMode> {};
class CacheGrowServedOtherTest : public CacheGrowServedBase {};

TEST_P(CacheGrowServedTest, GrowsInPlaceKeepingWhatItHoldsAndServesTheNewSpace) {
  const WriteMode mode = GetParam();
  open(mode);
  ASSERT_FALSE(h_->run(layer().prefetch({0, 4 * kChunk})));
  ASSERT_FALSE(write(2 * kChunk + 10, bytes(100, 0x77)));
  ASSERT_FALSE(flush());
  const auto before = layer().stats();
  remote_->clear_log();

  ASSERT_EQ(grow(kSize + 4 * kChunk), "");
  EXPECT_EQ(layer().chunk_count(), kChunks + 4);
  EXPECT_EQ(layer().image_size(), kSize + 4 * kChunk);
  EXPECT_EQ(layer().stats().chunks, kChunks + 4);
  EXPECT_EQ(layer().stats().present_bytes, before.present_bytes);
  EXPECT_EQ(layer().stats().dirty_bytes, before.dirty_bytes);
  EXPECT_EQ(std::filesystem::file_size(cache_path()), kSize + 4 * kChunk);
  ASSERT_EQ(store_->find("vm")->size, kSize + 4 * kChunk) << "the catalogue record grew";

  auto want = pattern(0, 4 * kChunk);
  std::fill_n(want.begin() + static_cast<long>(2 * kChunk + 10), 100, std::byte{0x77});
  EXPECT_EQ(read(0, 4 * kChunk), want);
  EXPECT_TRUE(remote_->log_of(Op::read).empty()) << "present chunks were fetched again";
  EXPECT_EQ(read(kSize, 4 * kChunk), bytes(4 * kChunk, 0));
  ASSERT_FALSE(remote_->log_of(Op::read).empty()) << "the new space is fetched from the remote";
  EXPECT_GE(remote_->log_of(Op::read)[0].offset, kSize);

  ASSERT_FALSE(write(kSize + kChunk + 7, bytes(3 * kChunk - 7, 0x55)));  // into the new space, to its end
  ASSERT_FALSE(flush());
  if (mode != WriteMode::writeback_local) {
    EXPECT_EQ(remote_->contents(kSize + kChunk + 7, 3 * kChunk - 7), bytes(3 * kChunk - 7, 0x55));
  } else {
    EXPECT_EQ(remote_->contents(kSize + kChunk, 3 * kChunk), bytes(3 * kChunk, 0)) << "writeback-local keeps it";
    EXPECT_EQ(layer().stats().dirty_bytes, before.dirty_bytes + 3 * kChunk);
  }
  h_->close();

  // It opens at the new size without growing again, with everything.
  remote_->clear_log();
  open(mode);
  EXPECT_EQ(layer().chunk_count(), kChunks + 4);
  EXPECT_EQ(read(0, 4 * kChunk), want);
  EXPECT_EQ(read(kSize + kChunk + 7, 3 * kChunk - 7), bytes(3 * kChunk - 7, 0x55));
  EXPECT_TRUE(remote_->log_of(Op::read).empty());
  // Every dirty chunk, old and new, reaches the grown remote.
  layer().start();
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(5)));
  EXPECT_EQ(remote_->contents(2 * kChunk + 10, 100), bytes(100, 0x77));
  EXPECT_EQ(remote_->contents(kSize + kChunk + 7, 3 * kChunk - 7), bytes(3 * kChunk - 7, 0x55));
}

INSTANTIATE_TEST_SUITE_P(Modes, CacheGrowServedTest, test::kAllWriteModes, test::write_mode_name);

TEST_F(CacheGrowServedOtherTest, ACrashAfterTheGrowKeepsWhatWasFlushedBeforeAndAfterIt) {
  open(WriteMode::writeback_local);
  layer().start();
  ASSERT_FALSE(write(3 * kChunk, bytes(kChunk, 0x31)));
  ASSERT_FALSE(write(kSize - 100, bytes(100, 0x32)));  // the old last chunk, to its end
  ASSERT_FALSE(flush());
  ASSERT_EQ(grow(2 * kSize), "");
  ASSERT_FALSE(write(kSize - 50, bytes(200, 0x33)));  // across the old end
  ASSERT_FALSE(write(2 * kSize - kChunk, bytes(kChunk, 0x34)));
  ASSERT_FALSE(flush());
  h_->crash();

  open(WriteMode::writeback_local);
  EXPECT_TRUE(layer().stats().recovered);
  EXPECT_EQ(layer().chunk_count(), 2 * kChunks);
  EXPECT_EQ(read(3 * kChunk, kChunk), bytes(kChunk, 0x31));
  EXPECT_EQ(read(kSize - 100, 50), bytes(50, 0x32));
  EXPECT_EQ(read(kSize - 50, 200), bytes(200, 0x33));
  EXPECT_EQ(read(kSize + 150, 100), bytes(100, 0));
  EXPECT_EQ(read(2 * kSize - kChunk, kChunk), bytes(kChunk, 0x34));
  EXPECT_EQ(remote_->contents(2 * kSize - kChunk, kChunk), bytes(kChunk, 0)) << "writeback-local keeps it local";
}

TEST_F(CacheGrowServedOtherTest, RefusesAShrinkAndACapacityThatWouldStartEvictionSayingWhy) {
  auto cfg = config(WriteMode::writeback);
  cfg.capacity = 2 * kSize;  // holds the image now: no eviction runs
  open_layer(cfg, nullptr, true);
  const std::string shrink = layer().grow_refusal(kSize / 2);
  EXPECT_NE(shrink.find("cannot shrink while served"), std::string::npos) << shrink;
  EXPECT_EQ(h_->run(layer().grow_while_served(kSize / 2)), "") << "smaller than now: nothing to do";
  EXPECT_EQ(layer().image_size(), kSize);
  EXPECT_EQ(grow(2 * kSize), "") << "up to the capacity";
  const std::string why = grow(4 * kSize);
  EXPECT_NE(why.find("capacity (" + std::to_string(2 * kSize) + " bytes) is smaller than the new size"),
            std::string::npos)
      << why;
  EXPECT_EQ(layer().grow_refusal(4 * kSize), why);
  EXPECT_EQ(layer().chunk_count(), 2 * kChunks) << "a refused grow changes nothing";
  EXPECT_EQ(read(2 * kSize - kChunk, kChunk), bytes(kChunk, 0));
}

TEST_F(CacheGrowServedOtherTest, AnEvictingCacheGrowsAndKeepsEvicting) {
  auto cfg = config(WriteMode::writeback);
  cfg.capacity = kSize / 2;
  open_layer(cfg, nullptr, true);
  ASSERT_EQ(grow(2 * kSize), "");
  EXPECT_EQ(read(0, 2 * kSize), [] {
    auto v = pattern(0, kSize);
    v.resize(2 * kSize);
    return v;
  }());
  ASSERT_TRUE(test::eventually([&] { return layer().stats().present_bytes <= kSize / 2; }, std::chrono::seconds(5)))
      << layer().stats().present_bytes;
}

// Requests on two other threads (each worker owns the chunks c % kWorkers ==
// its number, so a model of the image needs no lock), the background loop
// writing back and checkpointing, and a prefetch: the layer grows twice
// under them. Every read matches the model; so do the image and the remote
// at the end.
TEST_F(CacheGrowServedOtherTest, GrowsUnderConcurrentRequestsWriteBackAndPrefetch) {
  constexpr uint64_t kStart = 64 * kChunk;
  constexpr int kWorkers = 8;
  remote_ = std::make_shared<test::MemoryDevice>(core::Geometry{kStart, 1, 4096, 32u << 20},
                                                 remote_->capabilities());
  remote_->fill_pattern(0, kStart);
  const uint64_t sizes[] = {kStart, kStart + 40 * kChunk + 512, 3 * kStart};
  const uint64_t max = sizes[2];
  auto model = pattern(0, max);
  std::fill(model.begin() + static_cast<long>(kStart), model.end(), std::byte{0});
  writeback_delay_ = std::chrono::milliseconds(0);
  open_layer(config(WriteMode::writeback), nullptr, true);
  // Slow enough to be running while the layer grows: the pass re-reads the size.
  ASSERT_TRUE(layer().prefetch_start(core::PrefetchOrder::sequential).ok());
  ASSERT_TRUE(layer().prefetch_set_rate(2u << 20).ok());

  std::atomic<uint64_t> served{kStart};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> requests{0};
  auto worker = [&](int w) -> core::Task<std::string> {
    std::mt19937_64 rng(static_cast<uint64_t>(w) * 7919 + 1);
    std::vector<std::byte> buf;
    while (!stop.load()) {
      const uint64_t size = served.load();
      const uint64_t owned = ((size + kChunk - 1) / kChunk - static_cast<uint64_t>(w) + kWorkers - 1) / kWorkers;
      if (owned == 0) co_return "no chunk to work on";
      const uint64_t c = static_cast<uint64_t>(w) + kWorkers * (rng() % owned);
      const uint64_t start = c * kChunk, len_max = std::min(kChunk, size - start);
      const uint64_t off = start + rng() % len_max;
      const uint64_t len = 1 + rng() % (start + len_max - off);
      buf.resize(len);
      if (rng() % 2) {
        std::fill(buf.begin(), buf.end(), std::byte(static_cast<uint8_t>(rng() % 255 + 1)));
        if (auto ec = co_await layer().write(buf, off, rng() % 8 == 0 ? core::kFua : 0))
          co_return "write at " + std::to_string(off) + ": " + ec.message();
        std::copy(buf.begin(), buf.end(), model.begin() + static_cast<long>(off));
      } else {
        if (auto ec = co_await layer().read(buf, off, 0))
          co_return "read at " + std::to_string(off) + ": " + ec.message();
        if (!std::equal(buf.begin(), buf.end(), model.begin() + static_cast<long>(off)))
          co_return "read of " + std::to_string(len) + " bytes at " + std::to_string(off) + " differs from the model";
      }
      requests.fetch_add(1);
    }
    co_return std::string();
  };
  boost::asio::io_context clients;
  std::vector<std::future<std::string>> results;
  for (int w = 0; w < kWorkers; ++w)
    results.push_back(boost::asio::co_spawn(clients, worker(w), boost::asio::use_future));
  std::thread t1([&] { clients.run(); }), t2([&] { clients.run(); });

  auto wait_requests = [&](uint64_t n) {
    const uint64_t until = requests.load() + n;
    return test::eventually([&] { return requests.load() >= until; }, std::chrono::seconds(10));
  };
  EXPECT_TRUE(wait_requests(200));
  for (const uint64_t size : {sizes[1], sizes[2]}) {
    EXPECT_EQ(grow(size), "");
    served.store(size);  // the bounds (CheckedDevice) move after the cache grew
    EXPECT_TRUE(wait_requests(300));
  }
  stop.store(true);
  t1.join();
  t2.join();
  for (auto& r : results) EXPECT_EQ(r.get(), "");

  EXPECT_EQ(layer().chunk_count(), (max + kChunk - 1) / kChunk);
  EXPECT_TRUE(read(0, max) == model) << "the image differs from the model";
  ASSERT_FALSE(flush());
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(10)));
  EXPECT_TRUE(remote_->contents(0, max) == model) << "the remote differs from the model";
  // The prefetch reaches the new space too (it reads the size at each pass).
  EXPECT_NE(layer().report().prefetch.state, core::PrefetchState::failed);
  ASSERT_TRUE(layer().prefetch_set_rate(0).ok());
  EXPECT_TRUE(test::eventually([&] { return layer().stats().present_bytes == max; }, std::chrono::seconds(10)))
      << layer().stats().present_bytes;
}

}  // namespace
}  // namespace blockway::cache
