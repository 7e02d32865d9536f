// Unit tests for eviction in cache/cache_layer: a capacity far below the
// working set, with eviction taking chunks while requests that span several
// chunks wait on the remote. The first two tests replay, step by step, the
// interleavings that made reads fail with EIO and partial writes store a
// chunk whose unwritten part was zeroes; the last runs random requests of
// mixed sizes from several clients against a model of the image.
#include "cache/cache_layer.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_future.hpp>

#include <algorithm>
#include <future>
#include <mutex>
#include <random>
#include <thread>

namespace blockway::cache {
namespace {

using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 16;
constexpr uint64_t kSize = kChunk * kChunks;

class EvictionTest : public test::MemoryRemoteLayerTest, public ::testing::WithParamInterface<WriteMode> {
 protected:
  EvictionTest() : MemoryRemoteLayerTest(kChunk, kSize) {}

  // A cache of `capacity_chunks` chunks, its background loop (eviction every
  // 100 ms) running.
  CacheLayer& open_small(uint64_t capacity_chunks) {
    auto cfg = config(GetParam());
    cfg.capacity = capacity_chunks * kChunk;
    return open_layer(cfg, nullptr, true);
  }
  // Makes `chunk` present by a write of all of it, and waits until it is
  // written back (clean): not referenced, it is the clock's first victim.
  void present_and_clean(CacheLayer& l, uint64_t chunk, std::vector<std::byte>& model) {
    std::vector<std::byte> data(kChunk, std::byte{0x33});
    ASSERT_FALSE(write(chunk * kChunk, data));
    std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(chunk * kChunk));
    ASSERT_TRUE(test::eventually([&] { return l.stats().dirty_bytes == 0; }, std::chrono::seconds(10)));
  }
  // Waits (bounded) until eviction took `chunk` out of the cache.
  bool evicted(uint64_t chunk) {
    return test::eventually([&] {
      core::ExtentList out;
      EXPECT_FALSE(h_->run(layer().cache_status({chunk * kChunk, kChunk}, out)));
      return !out.empty() && (out[0].flags & 1) == 0;
    }, std::chrono::seconds(10));
  }
};

INSTANTIATE_TEST_SUITE_P(AllModes, EvictionTest, test::kAllWriteModes, test::write_mode_name);

// Makes whole chunks present without reading the remote (a write of a
// whole chunk allocates it in the cache in every mode), so that eviction has
// more than the capacity to work on while the remote's reads are held.
void fill_by_writes(test::MemoryRemoteLayerTest& t, CacheLayer& l, test::LayerHarness& h,
                    std::initializer_list<uint64_t> chunks, std::vector<std::byte>& model) {
  (void)t;
  for (uint64_t c : chunks) {
    std::vector<std::byte> data(kChunk, std::byte{static_cast<uint8_t>(0x40 + c)});
    ASSERT_FALSE(h.run(l.write(data, c * kChunk, 0)));
    std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(c * kChunk));
  }
}

// A read of chunks 0-1 finds 0 present and fetches 1; while the fetch waits
// on the remote, eviction runs. Chunk 0 must not be taken from under the
// read: it used to be, and the read then failed with EIO.
TEST_P(EvictionTest, ReadSpanningChunksIsNotFailedByEvictionWhileItFetches) {
  auto& l = open_small(2);
  auto model = pattern(0, kSize);
  present_and_clean(l, 0, model);
  remote_->close_gate(Op::read);
  std::vector<std::byte> buf(2 * kChunk - 8192);
  auto reading = boost::asio::co_spawn(h_->io(), l.read(buf, 4096, 0), boost::asio::use_future);
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) == 1; }));
  fill_by_writes(*this, l, *h_, {8, 9, 10, 11}, model);
  // Eviction ran while the read waited: it took chunks, but not chunk 0.
  ASSERT_TRUE(test::eventually([&] { return l.stats().evictions >= 2; }, std::chrono::seconds(10)))
      << l.stats().evictions;
  EXPECT_EQ(reading.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  remote_->open_gate(Op::read);
  ASSERT_EQ(reading.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(reading.get());
  EXPECT_EQ(buf, std::vector<std::byte>(model.begin() + 4096, model.begin() + 4096 + static_cast<long>(buf.size())));
  EXPECT_EQ(l.stats().failed_requests, 0u);
}

// A write over the second half of chunk 0 (present) and the first half of
// chunk 1 (absent) fetches the rest of chunk 1 first; while that waits on the
// remote, eviction takes chunk 0. The write must then fetch the rest of
// chunk 0 as well: it used to store the chunk with its unwritten half read
// as zeroes from the punched cache file (write-back modes).
TEST_P(EvictionTest, PartialWriteRefetchesAChunkEvictedWhileItWaited) {
  auto& l = open_small(2);
  auto model = pattern(0, kSize);
  present_and_clean(l, 0, model);
  remote_->close_gate(Op::read);
  std::vector<std::byte> data(kChunk, std::byte{0x99});
  auto writing = boost::asio::co_spawn(h_->io(), l.write(data, kChunk / 2, 0), boost::asio::use_future);
  std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(kChunk / 2));
  if (GetParam() != WriteMode::writethrough) {  // (writethrough never fetches for a write)
    ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) == 1; }));
  }
  fill_by_writes(*this, l, *h_, {8, 9, 10, 11}, model);
  ASSERT_TRUE(evicted(0));
  remote_->open_gate(Op::read);
  ASSERT_EQ(writing.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(writing.get());
  EXPECT_EQ(read(0, 2 * kChunk), std::vector<std::byte>(model.begin(), model.begin() + 2 * kChunk));
  EXPECT_EQ(l.stats().failed_requests, 0u);
}

// Random reads, writes and write-zeroes of mixed sizes and alignments from
// four clients at once, with a capacity of 3 of 16 chunks: every read must
// return the model's bytes and no request may fail.
TEST_P(EvictionTest, RandomRequestsFromSeveralClientsMatchTheModel) {
  auto& l = open_small(3);
  auto model = pattern(0, kSize);
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::mutex mutex;  // the model, the ranges in flight, the generator
  std::vector<std::pair<uint64_t, uint64_t>> busy;
  std::vector<std::string> failures;

  // Each client runs at least min_ops requests, and on until eviction took
  // 20 chunks (it runs every 100 ms), at most max_ops.
  auto client = [&](int min_ops, int max_ops) -> core::Task<void> {
    for (int i = 0; i < max_ops && (i < min_ops || l.stats().evictions < 20); ++i) {
      uint64_t off = 0, len = 0;
      int kind = 0;
      std::vector<std::byte> data;
      {
        std::lock_guard lock(mutex);
        for (;;) {
          static constexpr uint64_t kLens[] = {512, 4096, 5000, 65536, 70000, 131072, 200000};
          len = kLens[rng() % std::size(kLens)];
          off = (rng() % 2) ? rng() % (kSize - len + 1) : (rng() % ((kSize - len) / 4096 + 1)) * 4096;
          if (std::all_of(busy.begin(), busy.end(), [&](auto r) { return off + len <= r.first || r.second <= off; }))
            break;
        }
        busy.emplace_back(off, off + len);
        kind = static_cast<int>(rng() % 10);  // 0-2 write, 3 zero, else read
        if (kind <= 2) {
          data.resize(len);  // distinct per write and per position, cheap to make
          const uint64_t w = rng();
          for (size_t k = 0; k < len; ++k) data[k] = std::byte{static_cast<uint8_t>((w >> (k % 8 * 8)) + k / 8)};
        }
      }
      std::error_code ec;
      if (kind <= 2) {
        ec = co_await l.write(data, off, 0);
        std::lock_guard lock(mutex);
        std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(off));
      } else if (kind == 3 && GetParam() != WriteMode::writethrough) {
        ec = co_await l.zero({off, len}, 0);
        std::lock_guard lock(mutex);
        std::fill(model.begin() + static_cast<long>(off), model.begin() + static_cast<long>(off + len), std::byte{0});
      } else {
        std::vector<std::byte> buf(len);
        ec = co_await l.read(buf, off, 0);
        std::lock_guard lock(mutex);
        if (!ec && !std::equal(buf.begin(), buf.end(), model.begin() + static_cast<long>(off)))
          failures.push_back("read of " + std::to_string(len) + " at " + std::to_string(off) + " differs");
      }
      std::lock_guard lock(mutex);
      if (ec) failures.push_back("request at " + std::to_string(off) + ": " + ec.message());
      busy.erase(std::find(busy.begin(), busy.end(), std::make_pair(off, off + len)));
    }
  };
  std::vector<std::future<void>> clients;
  for (int i = 0; i < 4; ++i) clients.push_back(boost::asio::co_spawn(h_->io(), client(200, 20000), boost::asio::use_future));
  for (auto& c : clients) ASSERT_EQ(c.wait_for(std::chrono::seconds(120)), std::future_status::ready);
  for (auto& c : clients) c.get();
  for (const auto& f : failures) ADD_FAILURE() << f;
  EXPECT_EQ(read(0, kSize), model);
  EXPECT_GT(l.stats().evictions, 0u);
  EXPECT_EQ(l.stats().failed_requests, 0u);
}

}  // namespace
}  // namespace blockway::cache
