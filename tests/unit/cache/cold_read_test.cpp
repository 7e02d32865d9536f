// Unit tests for read misses in cache/cache_layer (issue 17): a miss serves
// the fetched bytes from the fetch itself (straight into the reply buffer
// when the reply holds the whole fetched run) and never reads back from the
// cache file what it just wrote there; and, randomized, many clients reading
// overlapping ranges of 512 B .. 1 MiB at once through an empty cache much
// smaller than the image, checked against the image, with every remote read
// checked for single flight (no two fetches of one chunk at a time).
//
// Thread model: the test thread drives; requests run on the harness's loop
// thread (several at once: the remote yields on a timer before each read,
// so the clients' misses interleave while fetches are in flight).
#include "cache/cache_layer.hpp"

#include "core/buffer_pool.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace blockway::cache {
namespace {

using test::Op;

constexpr uint64_t kChunk = 64u << 10;

// The remote, seen through a wait of 0-300 us before each read (so several
// fetches are in flight at once), which records every read it forwards and
// flags two reads in flight that overlap: the claims make fetches single-
// flight per chunk.
class YieldingRemote final : public core::Layer {
 public:
  YieldingRemote(std::unique_ptr<core::BlockDevice> next, boost::asio::any_io_executor ex)
      : core::Layer(std::move(next)), ex_(std::move(ex)) {}

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override {
    const uint64_t n = ticket_.fetch_add(1);
    boost::asio::steady_timer t(ex_, std::chrono::microseconds((n * 7919) % 300));
    co_await t.async_wait(boost::asio::use_awaitable);
    const std::pair<uint64_t, uint64_t> r{offset, offset + buf.size()};
    {
      std::lock_guard lock(mutex_);
      for (auto& o : active_)
        if (r.first < o.second && o.first < r.second) ++overlaps_;
      active_.push_back(r);
    }
    auto ec = co_await next().read(buf, offset, flags);
    {
      std::lock_guard lock(mutex_);
      active_.erase(std::find(active_.begin(), active_.end(), r));
    }
    co_return ec;
  }
  [[nodiscard]] uint64_t overlaps() const {
    std::lock_guard lock(mutex_);
    return overlaps_;
  }

 private:
  boost::asio::any_io_executor ex_;
  std::atomic<uint64_t> ticket_{0};
  mutable std::mutex mutex_;
  std::vector<std::pair<uint64_t, uint64_t>> active_;
  uint64_t overlaps_ = 0;
};

// ---- the miss path: no read of the cache file ---------------------------------

constexpr uint64_t kSmallSize = 16 * kChunk;

class MissPathTest : public test::MemoryRemoteLayerTest {
 protected:
  MissPathTest() : MemoryRemoteLayerTest(kChunk, kSmallSize) {}

  // A layer whose cache file is an in-memory device that counts its calls.
  CacheLayer& open_counted() {
    cache_dev_ = std::make_shared<test::MemoryDevice>(core::Geometry{kSmallSize, 1, 4096, 32u << 20}, test::native_caps());
    h_ = std::make_unique<test::LayerHarness>();
    CacheLayer::Params p;
    p.export_name = "vm";
    p.remote_uri = "memory://remote";
    p.config = config(WriteMode::writethrough);
    p.store = store_.get();
    auto dev = cache_dev_;
    p.open_cache_file = [dev](const std::string&) { return std::make_unique<test::SharedDevice>(dev); };
    return h_->open(std::make_unique<test::SharedDevice>(remote_), std::move(p));
  }
  std::shared_ptr<test::MemoryDevice> cache_dev_;
};

TEST_F(MissPathTest, AMissIsServedFromTheFetchNotFromTheCacheFile) {
  auto& l = open_counted();
  // Aligned on chunks: fetched straight into the reply.
  EXPECT_EQ(read(2 * kChunk, 4 * kChunk), pattern(2 * kChunk, 4 * kChunk));
  // Inside one chunk, unaligned: fetched into a pooled buffer, the part copied out.
  EXPECT_EQ(read(8 * kChunk + 1000, 5000), pattern(8 * kChunk + 1000, 5000));
  // Across chunk boundaries at both ends.
  EXPECT_EQ(read(10 * kChunk - 700, kChunk + 1400), pattern(10 * kChunk - 700, kChunk + 1400));
  EXPECT_EQ(cache_dev_->calls(Op::read), 0u);
  // What the misses wrote to the cache file is the image's bytes, whole chunks.
  EXPECT_EQ(cache_dev_->contents(2 * kChunk, 4 * kChunk), pattern(2 * kChunk, 4 * kChunk));
  EXPECT_EQ(cache_dev_->contents(8 * kChunk, kChunk), pattern(8 * kChunk, kChunk));
  EXPECT_EQ(cache_dev_->contents(9 * kChunk, 3 * kChunk), pattern(9 * kChunk, 3 * kChunk));
  EXPECT_EQ(l.stats().misses, 3u);
  EXPECT_EQ(l.stats().bytes_fetched, 8 * kChunk);

  // A miss over present and absent chunks reads only the present run from
  // the cache file (chunks 2-5 present, 6-7 absent).
  EXPECT_EQ(read(5 * kChunk + 100, 2 * kChunk), pattern(5 * kChunk + 100, 2 * kChunk));
  EXPECT_EQ(cache_dev_->calls(Op::read), 1u);
  auto reads = cache_dev_->log_of(Op::read);
  ASSERT_EQ(reads.size(), 1u);
  EXPECT_EQ(reads[0].offset, 5 * kChunk + 100);
  EXPECT_EQ(reads[0].length, kChunk - 100);
  // A hit reads the cache file, once.
  EXPECT_EQ(read(2 * kChunk, 6 * kChunk), pattern(2 * kChunk, 6 * kChunk));
  EXPECT_EQ(cache_dev_->calls(Op::read), 2u);
  EXPECT_EQ(l.stats().hits, 1u);
}

// Issue 16: one buffered write makes page-cache folios as large as itself,
// and a later 4 KiB write into a 1 MiB folio cost 4x one into a 64 KiB folio
// (bench/page_cache_folios.py): a 1 MiB fill writes the cache file 64 KiB
// at a time. (Clients' writes still go in as they come.)
TEST_F(MissPathTest, AFillWritesTheCacheFileAtMost64KiBAtATime) {
  open_counted();
  EXPECT_EQ(read(0, kSmallSize), pattern(0, kSmallSize));  // one 1 MiB fetched run
  auto writes = cache_dev_->log_of(Op::write);
  ASSERT_EQ(writes.size(), kSmallSize / (64u << 10));
  for (size_t i = 0; i < writes.size(); ++i) {
    EXPECT_EQ(writes[i].offset, i * (64u << 10));
    EXPECT_EQ(writes[i].length, 64u << 10);
  }
  EXPECT_EQ(cache_dev_->contents(0, kSmallSize), pattern(0, kSmallSize));
}

TEST_F(MissPathTest, AFailedFetchFailsTheReadAndLeavesTheChunkAbsent) {
  auto& l = open_counted();
  remote_->fail(Op::read, EIO);
  std::vector<std::byte> buf(2 * kChunk);
  EXPECT_EQ(h_->run(l.read(buf, 3 * kChunk, 0)), std::errc::io_error);
  core::ExtentList out;
  ASSERT_FALSE(h_->run(l.cache_status({3 * kChunk, 2 * kChunk}, out)));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].flags & 1, 0u);
  remote_->fail(Op::read, 0);
  EXPECT_EQ(read(3 * kChunk, 2 * kChunk), pattern(3 * kChunk, 2 * kChunk));
}

TEST_F(MissPathTest, AFailedCacheFileWriteFailsTheReadAndLeavesTheChunkAbsent) {
  auto& l = open_counted();
  cache_dev_->fail(Op::write, ENOSPC);
  std::vector<std::byte> buf(kChunk);
  EXPECT_EQ(h_->run(l.read(buf, 0, 0)), std::errc::no_space_on_device);
  EXPECT_EQ(l.stats().present_bytes, 0u);
  cache_dev_->fail(Op::write, 0);
  EXPECT_EQ(read(0, kChunk), pattern(0, kChunk));
  EXPECT_EQ(l.stats().present_bytes, kChunk);
}

// ---- randomized: concurrent readers over an empty, small cache -----------------

// 256 chunks and an odd tail (the last chunk is partial), a cache of 8
// chunks; the remote takes at most 96 KiB per request, so fetches of a run
// are split (into the reply too). Parameter: read-ahead chunks.
constexpr uint64_t kBigSize = 256 * kChunk + 5000;

class ColdReadTest : public test::MemoryRemoteLayerTest, public ::testing::WithParamInterface<uint32_t> {
 protected:
  ColdReadTest() : MemoryRemoteLayerTest(kChunk, kBigSize) {}
  void SetUp() override {
    test::MemoryRemoteLayerTest::SetUp();
    remote_ = std::make_shared<test::MemoryDevice>(core::Geometry{kBigSize, 1, 4096, 96u << 10}, test::native_caps());
    remote_->fill_pattern(0, kBigSize);
  }
};

INSTANTIATE_TEST_SUITE_P(Readahead, ColdReadTest, ::testing::Values(0u, 4u),
                         [](const auto& info) { return "readahead" + std::to_string(info.param); });

// Three rounds, each over a fresh (empty) cache: six clients read at once,
// half of their reads starting where another client's last read did
// (overlapping misses of the same chunks), sizes 512 B .. 1 MiB, half of
// them at any byte offset. Every read must return the image's bytes, no two
// fetches of one chunk may be in flight at once, and every chunk the cache
// holds afterwards must hold the image's bytes.
TEST_P(ColdReadTest, ConcurrentOverlappingReadsMatchTheImage) {
  const auto image = pattern(0, kBigSize);
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  uint64_t misses = 0;
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    h_ = std::make_unique<test::LayerHarness>();
    auto cfg = config(WriteMode::writethrough);
    cfg.dir = dir_.str() + "/cache" + std::to_string(round);
    cfg.capacity = 8 * kChunk;
    cfg.readahead_chunks = GetParam();
    CacheLayer::Params p;
    p.export_name = "vm";
    p.remote_uri = "memory://remote";
    p.config = cfg;
    p.store = store_.get();
    p.export_name = "vm" + std::to_string(round);
    auto yielding =
        std::make_unique<YieldingRemote>(std::make_unique<test::SharedDevice>(remote_), h_->io().get_executor());
    auto* remote = yielding.get();
    auto& l = h_->open(std::move(yielding), std::move(p));
    l.start();

    std::mutex mutex;  // rng, failures
    std::vector<std::string> failures;
    std::atomic<uint64_t> last_offset{0};
    auto client = [&](int ops) -> core::Task<void> {
      for (int i = 0; i < ops; ++i) {
        uint64_t off = 0, len = 0;
        {
          std::lock_guard lock(mutex);
          static constexpr uint64_t kLens[] = {512, 4096, 5000, 65536, 66048, 131072, 200000, 262144, 1u << 20};
          len = kLens[rng() % std::size(kLens)];
          const uint64_t span = kBigSize - len + 1;
          switch (rng() % 4) {
            case 0: off = last_offset.load() % span; break;
            case 1: off = (rng() % (span / 512)) * 512; break;
            case 2: off = (rng() % (kBigSize / kChunk)) * kChunk % span; break;
            default: off = rng() % span; break;
          }
        }
        last_offset.store(off);
        // Page-aligned like the NBD server's replies (whole aligned runs are
        // then written to the cache file with O_DIRECT), or 512 bytes off.
        const size_t shift = (off + len) % 3 == 0 ? 512 : 0;
        core::IoBuffer mem(len + shift);
        const auto buf = mem.span().subspan(shift, len);
        std::fill(buf.begin(), buf.end(), std::byte{0xee});
        auto ec = co_await l.read(buf, off, 0);
        std::lock_guard lock(mutex);
        if (ec)
          failures.push_back("read of " + std::to_string(len) + " at " + std::to_string(off) + ": " + ec.message());
        else if (!std::equal(buf.begin(), buf.end(), image.begin() + static_cast<long>(off)))
          failures.push_back("read of " + std::to_string(len) + " at " + std::to_string(off) + " differs");
      }
    };
    std::vector<std::future<void>> clients;
    for (int i = 0; i < 6; ++i) clients.push_back(boost::asio::co_spawn(h_->io(), client(60), boost::asio::use_future));
    for (auto& c : clients) ASSERT_EQ(c.wait_for(std::chrono::seconds(120)), std::future_status::ready);
    for (auto& c : clients) c.get();
    for (const auto& f : failures) ADD_FAILURE() << f;
    EXPECT_EQ(remote->overlaps(), 0u) << "two fetches of one chunk were in flight at once";
    const auto st = l.stats();
    misses += st.misses;
    EXPECT_EQ(st.failed_requests, 0u);
    EXPECT_EQ(st.fetch_errors, 0u);
    // Every chunk the cache holds holds the image's bytes (after close: no
    // read-ahead or eviction changes the file while it is compared).
    h_->run_void(l.close());
    core::ExtentList out;
    ASSERT_FALSE(h_->run(l.cache_status({0, kBigSize}, out)));
    std::vector<std::byte> file(kBigSize);
    {
      std::ifstream f(cfg.dir + "/vm" + std::to_string(round) + ".img", std::ios::binary);
      f.read(reinterpret_cast<char*>(file.data()), static_cast<std::streamsize>(kBigSize));
      ASSERT_EQ(f.gcount(), static_cast<std::streamsize>(kBigSize));
    }
    uint64_t pos = 0, present = 0;
    for (const auto& e : out) {
      if (e.flags & 1) {
        present += e.length;
        EXPECT_TRUE(std::equal(file.begin() + static_cast<long>(pos),
                               file.begin() + static_cast<long>(pos + e.length), image.begin() + static_cast<long>(pos)))
            << "present bytes at " << pos << " differ from the image";
      }
      pos += e.length;
    }
    EXPECT_EQ(pos, kBigSize);
    EXPECT_GT(present, 0u);
    h_->crash();
  }
  EXPECT_GT(misses, 100u);
}

}  // namespace
}  // namespace blockway::cache
