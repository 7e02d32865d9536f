// Unit tests for cache/cache_layer: the sector cache over an in-memory remote.
#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_future.hpp>

#include <cstdlib>
#include <filesystem>
#include <future>
#include <sys/stat.h>

namespace blockway::cache {
namespace {

using core::ByteRange;
using core::errno_code;
using core::Extent;
using core::ExtentList;
using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 16;
constexpr uint64_t kSize = kChunk * kChunks;

using test::bytes;

class CacheLayerTest : public test::MemoryRemoteLayerTest {
 protected:
  CacheLayerTest() : MemoryRemoteLayerTest(kChunk, kSize) {}

  CacheLayer& open(WriteMode mode) { return open_with(config(mode)); }
  CacheLayer& open_with(const CacheConfig& cfg) { return open_layer(cfg, nullptr, false); }
  void close() { h_->close(); }
  void crash() { h_->crash(); }

  std::error_code try_read(uint64_t off, uint64_t len) {
    std::vector<std::byte> buf(len);
    return h_->run(layer().read(buf, off, 0));
  }
  std::error_code flush() { return h_->run(layer().flush()); }
  ExtentList cache_status(ByteRange r) {
    ExtentList out;
    EXPECT_FALSE(h_->run(layer().cache_status(r, out)));
    return out;
  }
};

class CacheLayerModes : public CacheLayerTest, public ::testing::WithParamInterface<WriteMode> {};

INSTANTIATE_TEST_SUITE_P(AllModes, CacheLayerModes, test::kAllWriteModes, test::write_mode_name);

// ---- reads ------------------------------------------------------------------------

TEST_P(CacheLayerModes, ReadMissFetchesWholeChunksOnce) {
  open(GetParam());
  EXPECT_EQ(read(kChunk + 100, 1000), pattern(kChunk + 100, 1000));
  auto reads = remote_->log_of(Op::read);
  ASSERT_EQ(reads.size(), 1u);
  EXPECT_EQ(reads[0].offset, kChunk);
  EXPECT_EQ(reads[0].length, kChunk);
  // A second read of the same chunk, and of another part of it, is a hit.
  EXPECT_EQ(read(kChunk + 5000, 3000), pattern(kChunk + 5000, 3000));
  EXPECT_EQ(read(kChunk, kChunk), pattern(kChunk, kChunk));
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  const auto s = layer().stats();
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.bytes_fetched, kChunk);
  EXPECT_EQ(s.present_bytes, kChunk);
}

TEST_P(CacheLayerModes, ReadAcrossChunksFetchesOnlyAbsentOnes) {
  open(GetParam());
  (void)read(2 * kChunk, 10);  // chunk 2 present
  remote_->clear_log();
  EXPECT_EQ(read(kChunk + 10, 3 * kChunk), pattern(kChunk + 10, 3 * kChunk));  // chunks 1..4
  uint64_t fetched = 0;
  for (const auto& c : remote_->log_of(Op::read)) {
    EXPECT_TRUE(c.offset + c.length <= 2 * kChunk || c.offset >= 3 * kChunk) << c.offset;
    fetched += c.length;
  }
  EXPECT_EQ(fetched, 3 * kChunk);
}

TEST_P(CacheLayerModes, ConcurrentMissesOnOneChunkMakeOneRemoteFetch) {
  open(GetParam());
  remote_->close_gate(Op::read);
  std::vector<std::future<std::error_code>> done;
  std::vector<std::vector<std::byte>> bufs(8, std::vector<std::byte>(4096));
  for (size_t i = 0; i < bufs.size(); ++i)
    done.push_back(boost::asio::co_spawn(h_->io(), layer().read(bufs[i], 3 * kChunk + i * 4096, 0),
                                         boost::asio::use_future));
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) >= 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // let the others pile up
  remote_->open_gate(Op::read);
  for (size_t i = 0; i < done.size(); ++i) {
    EXPECT_FALSE(done[i].get());
    EXPECT_EQ(bufs[i], pattern(3 * kChunk + i * 4096, 4096));
  }
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  EXPECT_EQ(remote_->max_in_flight(Op::read), 1u);
  // The seven that waited for the fetch count as misses too (they did not
  // find the chunk), though they read it as hits once it came.
  EXPECT_EQ(layer().stats().misses, 8u);
  EXPECT_EQ(layer().stats().hits, 0u);
}

TEST_P(CacheLayerModes, ReadersOfAFailedFillFetchTheChunkThemselves) {
  open(GetParam());
  remote_->close_gate(Op::read);
  remote_->fail(Op::read, EIO);
  std::vector<std::byte> first(4096), second(4096);
  auto a = boost::asio::co_spawn(h_->io(), layer().read(first, 5 * kChunk, 0), boost::asio::use_future);
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) >= 1; }));
  auto b = boost::asio::co_spawn(h_->io(), layer().read(second, 5 * kChunk + 8192, 0), boost::asio::use_future);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // b waits for a's fill
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  remote_->open_gate(Op::read);
  EXPECT_EQ(a.get(), errno_code(EIO));
  // b found the chunk still absent after the failed fill and fetched it
  // itself (failing too while the remote fails: it did not read stale bytes).
  EXPECT_EQ(b.get(), errno_code(EIO));
  EXPECT_EQ(remote_->calls(Op::read), 2u);
  remote_->fail(Op::read, 0);
  EXPECT_EQ(read(5 * kChunk + 8192, 4096), pattern(5 * kChunk + 8192, 4096));
}

TEST_P(CacheLayerModes, HitsDoNotTouchTheRemote) {
  open(GetParam());
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  remote_->clear_log();
  remote_->fail(Op::read, EIO);
  for (uint64_t off = 0; off < kSize; off += 12345) EXPECT_EQ(read(off, 1000 < kSize - off ? 1000 : kSize - off), pattern(off, std::min<uint64_t>(1000, kSize - off)));
  EXPECT_TRUE(remote_->log().empty());
}

TEST_P(CacheLayerModes, ReadOfPresentChunksWorksWhileTheRemoteFails) {
  open(GetParam());
  (void)read(0, 2 * kChunk);
  remote_->fail(Op::read, EIO);
  remote_->fail(Op::block_status, EIO);
  EXPECT_EQ(read(100, 2 * kChunk - 100), pattern(100, 2 * kChunk - 100));
  EXPECT_EQ(try_read(2 * kChunk, 10), errno_code(EIO));
  EXPECT_GE(layer().stats().fetch_errors, 1u);
  // Service resumes when the remote does.
  remote_->fail(Op::read, 0);
  EXPECT_EQ(read(2 * kChunk, 10), pattern(2 * kChunk, 10));
}

TEST_P(CacheLayerModes, ReadaheadFetchesAheadOfASequentialReader) {
  auto cfg = config(GetParam());
  cfg.readahead_chunks = 4;
  open_with(cfg);
  (void)read(0, kChunk);
  (void)read(kChunk, kChunk);  // sequential miss: read ahead chunks 2..5
  ASSERT_TRUE(test::eventually([&] { return layer().stats().present_bytes >= 6 * kChunk; }));
  remote_->clear_log();
  EXPECT_EQ(read(2 * kChunk, 4 * kChunk), pattern(2 * kChunk, 4 * kChunk));
  EXPECT_TRUE(remote_->log_of(Op::read).empty());
}

// ---- writes -----------------------------------------------------------------------

TEST_P(CacheLayerModes, PartialWriteToAnAbsentChunkMergesWithTheRemoteBytes) {
  open(GetParam());
  ASSERT_FALSE(write(kChunk + 100, bytes(10, 0)));
  auto expect = pattern(kChunk, kChunk);
  std::fill_n(expect.begin() + 100, 10, std::byte{0});
  EXPECT_EQ(read(kChunk, kChunk), expect);
  // Across a chunk boundary, partial at both ends.
  ASSERT_FALSE(write(3 * kChunk - 7, bytes(kChunk + 14, 0xAB)));
  auto e2 = pattern(2 * kChunk, 3 * kChunk);
  std::fill_n(e2.begin() + static_cast<long>(kChunk - 7), kChunk + 14, std::byte{0xAB});
  EXPECT_EQ(read(2 * kChunk, 3 * kChunk), e2);
  ASSERT_FALSE(flush());
  EXPECT_EQ(read(2 * kChunk, 3 * kChunk), e2);
}

TEST_P(CacheLayerModes, WholeChunkWriteDoesNotFetch) {
  if (GetParam() == WriteMode::writethrough) GTEST_SKIP() << "writethrough writes go to the remote";
  open(GetParam());
  ASSERT_FALSE(write(4 * kChunk, bytes(2 * kChunk, 7)));
  EXPECT_EQ(remote_->calls(Op::read), 0u);
  EXPECT_EQ(read(4 * kChunk, 2 * kChunk), bytes(2 * kChunk, 7));
  EXPECT_EQ(remote_->calls(Op::read), 0u);
}

TEST_P(CacheLayerModes, ZeroAndTrimDoNotFetchTheChunksTheyCover) {
  open(GetParam());
  ASSERT_FALSE(h_->run(layer().zero({kChunk, 3 * kChunk}, 0)));
  EXPECT_EQ(remote_->calls(Op::read), 0u);
  EXPECT_EQ(read(kChunk, 3 * kChunk), bytes(3 * kChunk, 0));
  if (GetParam() != WriteMode::writethrough) {
    EXPECT_EQ(remote_->calls(Op::read), 0u);
  }
  remote_->clear_log();
  const uint64_t before = remote_->calls(Op::read);
  // Trim from the middle of chunk 5 to the middle of chunk 9: at most the two
  // partial chunks may be fetched, never the three in between.
  ASSERT_FALSE(h_->run(layer().trim({5 * kChunk + 100, 4 * kChunk}, 0)));
  uint64_t fetched = 0;
  for (const auto& c : remote_->log_of(Op::read)) fetched += c.length;
  EXPECT_LE(fetched, 2 * kChunk);
  (void)before;
  // Trimmed data reads back as zero or as the old data, never as anything else,
  // and the same way twice.
  auto a = read(5 * kChunk, 5 * kChunk);
  auto b = read(5 * kChunk, 5 * kChunk);
  EXPECT_EQ(a, b);
  auto old = pattern(5 * kChunk, 5 * kChunk);
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != old[i] && a[i] != std::byte{0}) {
      ADD_FAILURE() << "byte " << i << " of the trimmed range is neither old nor zero";
      break;
    }
  // Partially covered parts outside the trim keep their data.
  EXPECT_EQ(std::vector<std::byte>(a.begin(), a.begin() + 100), pattern(5 * kChunk, 100));
}

TEST_P(CacheLayerModes, WriteReadsBackAndSurvivesClose) {
  open(GetParam());
  ASSERT_FALSE(write(1000, bytes(200000, 0x5A)));
  EXPECT_EQ(read(1000, 200000), bytes(200000, 0x5A));
  ASSERT_FALSE(flush());
  close();
  open(GetParam());
  EXPECT_EQ(read(1000, 200000), bytes(200000, 0x5A));
  EXPECT_EQ(read(0, 1000), pattern(0, 1000));
}

TEST_F(CacheLayerTest, WritethroughWriteReachesTheRemoteBeforeTheAck) {
  open(WriteMode::writethrough);
  remote_->close_gate(Op::write);
  auto data = bytes(8192, 0x11);
  auto fut = boost::asio::co_spawn(h_->io(), layer().write(data, 2 * kChunk, 0), boost::asio::use_future);
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::write) == 1; }));
  EXPECT_EQ(fut.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout)
      << "acknowledged before the remote acknowledged";
  remote_->open_gate(Op::write);
  EXPECT_FALSE(fut.get());
  EXPECT_EQ(remote_->contents(2 * kChunk, 8192), data);
  // FUA is passed on, FLUSH is passed on.
  ASSERT_FALSE(write(0, bytes(512, 1), core::kFua));
  auto writes = remote_->log_of(Op::write);
  ASSERT_EQ(writes.size(), 2u);
  EXPECT_TRUE(writes[1].flags & core::kFua);
  ASSERT_FALSE(flush());
  EXPECT_EQ(remote_->calls(Op::flush), 1u);
  EXPECT_EQ(layer().stats().dirty_bytes, 0u);
}

// A writethrough write that only partly covers absent chunks has nothing to
// keep in step in the cache file: it goes to the remote alone, and a later
// read fetches the chunk with the new bytes.
TEST_F(CacheLayerTest, WritethroughPartialWriteToAnAbsentChunkSkipsTheCacheFile) {
  open(WriteMode::writethrough);
  auto data = bytes(4096, 0x3C);
  ASSERT_FALSE(write(2 * kChunk + 512, data));
  EXPECT_EQ(remote_->contents(2 * kChunk + 512, 4096), data);
  uint64_t allocated = 0;
  for (const auto& f : std::filesystem::recursive_directory_iterator(dir_.str()))
    if (f.is_regular_file() && f.path().extension() != ".db" && f.path().string().find(".db-") == std::string::npos) {
      struct stat st {};
      ASSERT_EQ(::stat(f.path().c_str(), &st), 0);
      allocated += static_cast<uint64_t>(st.st_blocks);
    }
  EXPECT_EQ(allocated, 0u) << "the cache file was written although no chunk it holds changed";
  EXPECT_EQ(layer().stats().present_bytes, 0u);
  auto got = read(2 * kChunk, kChunk);
  EXPECT_EQ(std::vector<std::byte>(got.begin() + 512, got.begin() + 512 + 4096), data);
  EXPECT_EQ(std::vector<std::byte>(got.begin(), got.begin() + 512), pattern(2 * kChunk, 512));
  // Now present: the next partial write keeps the cache file in step.
  auto more = bytes(100, 0x3D);
  ASSERT_FALSE(write(2 * kChunk + 10, more));
  const auto calls = remote_->calls(Op::read);
  got = read(2 * kChunk, 200);
  EXPECT_EQ(std::vector<std::byte>(got.begin() + 10, got.begin() + 110), more);
  EXPECT_EQ(remote_->calls(Op::read), calls) << "a present chunk was fetched again";
}

TEST_F(CacheLayerTest, WritethroughWriteErrorIsReportedAndNothingChanges) {
  open(WriteMode::writethrough);
  (void)read(0, kChunk);
  remote_->fail(Op::write, EIO);
  EXPECT_EQ(write(100, bytes(100, 9)), errno_code(EIO));
  EXPECT_EQ(read(0, kChunk), pattern(0, kChunk));
}

TEST_F(CacheLayerTest, WritebackFlushWritesDirtyDataToTheRemoteAndFlushesIt) {
  open(WriteMode::writeback);
  ASSERT_FALSE(write(3 * kChunk, bytes(kChunk, 0x33)));
  ASSERT_FALSE(write(7 * kChunk + 5, bytes(10, 0x77)));
  EXPECT_EQ(remote_->calls(Op::write), 0u) << "writeback acknowledges from the cache";
  // Chunk 7, written in part, is dirty once its deferred fill completes
  // (after the fill's grace, cache_deferred_fill.cpp).
  EXPECT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 2 * kChunk; }))
      << layer().stats().dirty_bytes;
  auto cs = cache_status({3 * kChunk, kChunk});
  ASSERT_EQ(cs.size(), 1u);
  EXPECT_EQ(cs[0].flags, 3u);
  remote_->clear_log();
  ASSERT_FALSE(flush());
  EXPECT_EQ(remote_->contents(3 * kChunk, kChunk), bytes(kChunk, 0x33));
  EXPECT_EQ(remote_->contents(7 * kChunk + 5, 10), bytes(10, 0x77));
  auto log = remote_->log();
  ASSERT_FALSE(log.empty());
  EXPECT_EQ(log.back().op, Op::flush) << "the remote must flush after the write-back";
  EXPECT_EQ(layer().stats().dirty_bytes, 0u);
  EXPECT_EQ(layer().stats().bytes_written_back, 2 * kChunk);
  // Nothing dirty: a second flush writes nothing.
  remote_->clear_log();
  ASSERT_FALSE(flush());
  EXPECT_TRUE(remote_->log_of(Op::write).empty());
}

// Zeroed chunks are holes of the cache file: their write-back sends zeroes
// (the remote's write-zeroes, or a buffer of zeroes) without reading them,
// and a run with data next to them still carries its bytes.
TEST_F(CacheLayerTest, WritebackOfZeroedChunksSendsZeroesAndKeepsDataAround) {
  open(WriteMode::writeback);
  ASSERT_FALSE(write(2 * kChunk, bytes(kChunk, 0x22)));
  ASSERT_FALSE(h_->run(layer().zero({4 * kChunk, 4 * kChunk}, 0)));
  ASSERT_FALSE(h_->run(layer().trim({9 * kChunk, 2 * kChunk}, 0)));
  ASSERT_FALSE(write(11 * kChunk, bytes(kChunk, 0x11)));  // data right after a trimmed run
  remote_->clear_log();
  ASSERT_FALSE(flush());
  EXPECT_EQ(remote_->contents(2 * kChunk, kChunk), bytes(kChunk, 0x22));
  EXPECT_EQ(remote_->contents(4 * kChunk, 4 * kChunk), bytes(4 * kChunk, 0));
  EXPECT_EQ(remote_->contents(9 * kChunk, 2 * kChunk), bytes(2 * kChunk, 0));
  EXPECT_EQ(remote_->contents(11 * kChunk, kChunk), bytes(kChunk, 0x11));
  EXPECT_EQ(remote_->contents(8 * kChunk, kChunk), pattern(8 * kChunk, kChunk)) << "never written";
  uint64_t zeroed = 0;
  for (const auto& c : remote_->log_of(Op::zero)) zeroed += c.length;
  EXPECT_EQ(zeroed, 4 * kChunk) << "the zeroed run went as write-zeroes";
  EXPECT_EQ(layer().stats().dirty_bytes, 0u);
}

// The same over a remote without write-zeroes: the zeroes go as data.
TEST_F(CacheLayerTest, WritebackOfZeroedChunksWritesZeroesWhereTheRemoteCannotZero) {
  core::Capabilities caps;
  caps.flush = caps.fua = caps.trim = caps.extents = core::Support::native;
  make_remote(caps);
  open(WriteMode::writeback);
  ASSERT_FALSE(h_->run(layer().zero({kChunk, 3 * kChunk}, 0)));
  ASSERT_FALSE(write(6 * kChunk + 4096, bytes(8192, 0x66)));
  ASSERT_FALSE(flush());
  EXPECT_EQ(remote_->contents(kChunk, 3 * kChunk), bytes(3 * kChunk, 0));
  EXPECT_EQ(remote_->contents(6 * kChunk + 4096, 8192), bytes(8192, 0x66));
  EXPECT_EQ(remote_->contents(6 * kChunk, 4096), pattern(6 * kChunk, 4096));
  EXPECT_EQ(remote_->calls(Op::zero), 0u);
}

// Chunks larger than a write-back run's shared zeroes (kMaxRun, 1 MiB): a
// zeroed one is written back from a buffer of zeroes.
class CacheLayerBigChunkTest : public test::MemoryRemoteLayerTest {
 protected:
  CacheLayerBigChunkTest() : MemoryRemoteLayerTest(2u << 20, 8u << 20) {}
};

TEST_F(CacheLayerBigChunkTest, WritebackOfAZeroedChunkLargerThanARunWritesZeroes) {
  core::Capabilities caps;
  caps.flush = caps.fua = caps.trim = caps.extents = core::Support::native;
  make_remote(caps);
  open_layer(config(WriteMode::writeback), nullptr, false);
  ASSERT_FALSE(h_->run(layer().zero({2u << 20, 4u << 20}, 0)));
  ASSERT_FALSE(h_->run(layer().flush()));
  EXPECT_EQ(remote_->contents(2u << 20, 4u << 20), bytes(4u << 20, 0));
  EXPECT_EQ(remote_->contents(0, 2u << 20), pattern(0, 2u << 20));
  EXPECT_EQ(remote_->calls(Op::zero), 0u);
}

TEST_F(CacheLayerTest, WritebackFuaWriteReachesTheRemote) {
  open(WriteMode::writeback);
  ASSERT_FALSE(write(kChunk, bytes(kChunk, 1)));  // dirty, not FUA
  ASSERT_FALSE(write(5 * kChunk, bytes(4096, 2), core::kFua));
  EXPECT_EQ(remote_->contents(5 * kChunk, 4096), bytes(4096, 2));
  EXPECT_GE(remote_->calls(Op::flush), 1u);
  auto cs = cache_status({5 * kChunk, kChunk});
  ASSERT_EQ(cs.size(), 1u);
  EXPECT_EQ(cs[0].flags, 1u);
}

TEST_F(CacheLayerTest, WritebackFlushFailsWhileTheRemoteFailsAndKeepsChunksDirty) {
  open(WriteMode::writeback);
  ASSERT_FALSE(write(0, bytes(kChunk, 4)));
  remote_->fail(Op::write, EIO);
  EXPECT_EQ(flush(), errno_code(EIO));
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  remote_->fail(Op::write, 0);
  remote_->fail(Op::flush, EIO);
  EXPECT_EQ(flush(), errno_code(EIO)) << "the remote's flush failed: the data is not durable there";
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  remote_->fail(Op::flush, 0);
  ASSERT_FALSE(flush());
  EXPECT_EQ(layer().stats().dirty_bytes, 0u);
  EXPECT_EQ(remote_->contents(0, kChunk), bytes(kChunk, 4));
}

TEST_F(CacheLayerTest, WritebackLocalFlushDoesNotTouchTheRemoteButSurvivesRecreation) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(2 * kChunk + 10, bytes(3 * kChunk, 0x42)));
  ASSERT_FALSE(write(9 * kChunk, bytes(512, 0x43), core::kFua));
  remote_->clear_log();
  ASSERT_FALSE(flush());
  for (const auto& c : remote_->log()) EXPECT_NE(c.op, Op::write);
  EXPECT_EQ(remote_->calls(Op::flush), 0u);
  EXPECT_EQ(remote_->contents(2 * kChunk + 10, 16), pattern(2 * kChunk + 10, 16));
  crash();  // no close(): an unclean stop
  open(WriteMode::writeback_local);
  EXPECT_TRUE(layer().stats().recovered);
  remote_->clear_log();
  EXPECT_EQ(read(2 * kChunk + 10, 3 * kChunk), bytes(3 * kChunk, 0x42));
  EXPECT_EQ(read(9 * kChunk, 512), bytes(512, 0x43));
  EXPECT_EQ(read(2 * kChunk, 10), pattern(2 * kChunk, 10));
  EXPECT_EQ(layer().stats().dirty_bytes, 5 * kChunk);
}

TEST_F(CacheLayerTest, BackgroundWriteBackEventuallyCleans) {
  open(WriteMode::writeback_local);
  layer().start();
  ASSERT_FALSE(write(kChunk, bytes(2 * kChunk + 3, 0x61)));
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(5)));
  EXPECT_EQ(remote_->contents(kChunk, 2 * kChunk + 3), bytes(2 * kChunk + 3, 0x61));
  EXPECT_GE(remote_->calls(Op::flush), 1u);
  close();
}

TEST_F(CacheLayerTest, BackgroundWriteBackFailureKeepsChunksDirtyAndRetries) {
  open(WriteMode::writeback_local);
  layer().start();
  remote_->fail(Op::write, EIO);
  ASSERT_FALSE(write(0, bytes(kChunk, 0x71)));
  ASSERT_FALSE(flush()) << "writeback-local FLUSH must not need the remote";
  ASSERT_FALSE(write(6 * kChunk, bytes(100, 0x72))) << "writes keep working while the remote fails";
  ASSERT_TRUE(test::eventually([&] { return layer().stats().writeback_errors >= 1; }, std::chrono::seconds(5)));
  // The 100-byte write's chunk counts as dirty once its deferred fill is
  // done (a grace, then the fetch): under load that can be after the first
  // failed write-back. With the remote refusing writes it cannot get clean.
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 2 * kChunk; }, std::chrono::seconds(5)))
      << layer().stats().dirty_bytes;
  EXPECT_EQ(read(0, kChunk), bytes(kChunk, 0x71));
  remote_->fail(Op::write, 0);
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(15)));
  EXPECT_EQ(remote_->contents(0, kChunk), bytes(kChunk, 0x71));
  EXPECT_EQ(remote_->contents(6 * kChunk, 100), bytes(100, 0x72));
  close();
}

TEST_F(CacheLayerTest, DirtyChunksOfWritebackLocalAreWrittenBackAfterARestart) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(4 * kChunk, bytes(kChunk, 0x44)));
  ASSERT_FALSE(flush());
  crash();
  open(WriteMode::writeback_local);
  layer().start();
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(5)));
  EXPECT_EQ(remote_->contents(4 * kChunk, kChunk), bytes(kChunk, 0x44));
  close();
}

// ---- status -----------------------------------------------------------------------

TEST_P(CacheLayerModes, CacheStatusShowsPresentAndDirty) {
  open(GetParam());
  (void)read(0, kChunk);                        // chunk 0 present
  ASSERT_FALSE(write(2 * kChunk, bytes(kChunk, 1)));  // chunk 2 written
  auto cs = cache_status({0, kSize});
  const uint32_t written = GetParam() == WriteMode::writethrough ? 1u : 3u;
  ExtentList want{{kChunk, 1}, {kChunk, 0}, {kChunk, written}, {kSize - 3 * kChunk, 0}};
  EXPECT_EQ(cs, want);
  // A range inside one chunk.
  EXPECT_EQ(cache_status({2 * kChunk + 10, 20}), (ExtentList{{20, written}}));
  ExtentList out;
  EXPECT_EQ(h_->run(layer().cache_status({0, 0}, out)), errno_code(EINVAL));
}

TEST_P(CacheLayerModes, BlockStatusReportsDirtyChunksAsData) {
  open(GetParam());
  remote_->set_extents({{kSize, core::kExtentHole | core::kExtentZero}});
  ASSERT_FALSE(write(3 * kChunk, bytes(kChunk, 1)));
  ExtentList out;
  ASSERT_FALSE(h_->run(layer().block_status({0, kSize}, out)));
  uint64_t total = 0;
  for (auto& e : out) total += e.length;
  EXPECT_EQ(total, kSize);
  if (GetParam() == WriteMode::writethrough) {
    // The remote has the data: what it says is the truth (its fake says hole).
    EXPECT_EQ(out, (ExtentList{{kSize, core::kExtentHole | core::kExtentZero}}));
  } else {
    const uint32_t hz = core::kExtentHole | core::kExtentZero;
    EXPECT_EQ(out, (ExtentList{{3 * kChunk, hz}, {kChunk, 0}, {kSize - 4 * kChunk, hz}}));
    ASSERT_FALSE(flush());
    if (GetParam() == WriteMode::writeback) {
      out.clear();
      ASSERT_FALSE(h_->run(layer().block_status({0, kSize}, out)));
      EXPECT_EQ(out, (ExtentList{{kSize, hz}})) << "clean chunks: the remote's answer";
    }
  }
}

// ---- restart ----------------------------------------------------------------------

TEST_P(CacheLayerModes, RestartReusesTheCacheWithoutRefetching) {
  open(GetParam());
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  ASSERT_FALSE(write(kChunk, bytes(100, 0x99)));
  ASSERT_FALSE(flush());
  close();
  remote_->clear_log();
  open(GetParam());
  EXPECT_FALSE(layer().stats().recovered);
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  auto all = read(0, kSize);
  EXPECT_TRUE(remote_->log_of(Op::read).empty()) << "present chunks were fetched again";
  auto expect = pattern(0, kSize);
  std::fill_n(expect.begin() + static_cast<long>(kChunk), 100, std::byte{0x99});
  EXPECT_EQ(all, expect);
}

TEST_P(CacheLayerModes, RestartAfterAnUncleanStopKeepsUntouchedRegions) {
  open(GetParam());
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  close();  // everything present, persisted
  open(GetParam());
  ASSERT_FALSE(write(0, bytes(10, 1)));  // region 0 gets a write-intent
  crash();
  remote_->clear_log();
  open(GetParam());
  EXPECT_TRUE(layer().stats().recovered);
  auto all = read(0, kSize);
  EXPECT_EQ(std::vector<std::byte>(all.begin() + 10, all.end()), pattern(10, kSize - 10));
  if (GetParam() == WriteMode::writeback_local || GetParam() == WriteMode::writethrough) {
    // The write was not flushed: either value is allowed, but consistently.
    EXPECT_EQ(read(0, 10), std::vector<std::byte>(all.begin(), all.begin() + 10));
  }
}

// The write-intent a sequential writer marks ahead of itself is capped in
// bytes (32 MiB, at least one region), not in regions: with large chunks a
// region is large, and a crash drops the clean chunks of every intent region.
class IntentAhead : public test::MemoryRemoteLayerTest, public ::testing::WithParamInterface<WriteMode> {
 protected:
  static constexpr uint64_t kBigChunk = 512u << 10;       // a region is 32 MiB
  static constexpr uint64_t kRegion = 64 * kBigChunk;
  IntentAhead() : MemoryRemoteLayerTest(kBigChunk, 4 * kRegion) {}
  std::vector<uint64_t> persisted_intent() { return store_->load_bitmap("vm", BitmapKind::intent, 1); }
};

INSTANTIATE_TEST_SUITE_P(AllModes, IntentAhead, test::kAllWriteModes, test::write_mode_name);

TEST_P(IntentAhead, ASequentialWriterMarksAtMost32MiBAhead) {
  open_layer(config(GetParam()), nullptr, false);  // no background checkpoint clears intent meanwhile
  ASSERT_FALSE(write(kRegion - kBigChunk, bytes(kBigChunk, 0x31)));  // the last chunk of region 0
  EXPECT_EQ(persisted_intent(), std::vector<uint64_t>{0b1});
  ASSERT_FALSE(write(kRegion, bytes(kBigChunk, 0x32)));  // moves on into region 1
  // Regions 1 and the one after it (32 MiB); region 3 is 64 MiB ahead.
  EXPECT_EQ(persisted_intent(), std::vector<uint64_t>{0b111});
  EXPECT_EQ(read(kRegion, kBigChunk), bytes(kBigChunk, 0x32));
}

TEST_F(CacheLayerTest, SettingsChangeWithDirtyDataRefusesToStart) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(0, bytes(kChunk, 5)));
  ASSERT_FALSE(flush());
  close();
  auto cfg = config(WriteMode::writeback_local);
  cfg.chunk_size = 2 * kChunk;
  try {
    open_with(cfg);
    FAIL() << "started over a cache with dirty data and another chunk size";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not yet written"), std::string::npos) << e.what();
  }
  h_.reset();
  // The old settings still work and still have the data.
  open(WriteMode::writeback_local);
  EXPECT_EQ(read(0, kChunk), bytes(kChunk, 5));
}

TEST_F(CacheLayerTest, SettingsChangeWithoutDirtyDataStartsEmpty) {
  open(WriteMode::writeback);
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  close();
  auto cfg = config(WriteMode::writeback);
  cfg.chunk_size = 2 * kChunk;
  open_with(cfg);
  EXPECT_EQ(layer().stats().present_bytes, 0u);
  remote_->clear_log();
  EXPECT_EQ(read(0, 10), pattern(0, 10));
  EXPECT_EQ(remote_->log_of(Op::read).size(), 1u);
}

TEST_F(CacheLayerTest, CapabilitiesFollowTheMode) {
  open(WriteMode::writeback_local);
  auto c = layer().capabilities();
  EXPECT_EQ(c.flush, core::Support::native);
  EXPECT_EQ(c.fua, core::Support::native);
  EXPECT_EQ(c.trim, core::Support::native);
  EXPECT_EQ(c.zero, core::Support::native);
  EXPECT_TRUE(c.multi_conn);
}

// ---- regressions: bugs found while writing these tests ------------------------------

// Switching an export from writeback-local to writethrough while chunks are
// dirty: the inherited dirty chunks must still reach the remote.
TEST_F(CacheLayerTest, ModeSwitchToWritethroughWritesDirtyChunksBack) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(0, bytes(kChunk, 0x21)));
  ASSERT_FALSE(flush());
  close();
  open(WriteMode::writethrough);
  layer().start();
  ASSERT_FALSE(flush());
  EXPECT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(3)));
  EXPECT_EQ(remote_->contents(0, kChunk), bytes(kChunk, 0x21)) << "FLUSH in writethrough must make the data "
                                                                   "durable on the remote";
  close();
}

// A writethrough FUA write to a remote that does not support FUA: the layer
// advertises FUA natively, so it must emulate it (remote write + flush).
TEST_F(CacheLayerTest, WritethroughFuaToARemoteWithoutFuaFlushesTheRemote) {
  core::Capabilities caps;
  caps.flush = core::Support::native;
  caps.fua = core::Support::none;
  make_remote(caps);
  open(WriteMode::writethrough);
  EXPECT_EQ(layer().capabilities().fua, core::Support::native);
  ASSERT_FALSE(write(0, bytes(512, 1), core::kFua));
  const bool flag_passed = !remote_->log_of(Op::write).empty() && (remote_->log_of(Op::write)[0].flags & core::kFua);
  EXPECT_FALSE(flag_passed);
  EXPECT_GE(remote_->calls(Op::flush), 1u);
}

// close() does not wait for read-ahead started by start_readahead() (detached
// on the background executor): after close() returns, the layer can still be
// fetching into the cache, and the daemon destroys it right after.
TEST_F(CacheLayerTest, CloseWaitsForReadahead) {
  // Reads at or beyond `hold_from` wait while `hold` is set.
  struct HoldingRemote final : core::Layer {
    explicit HoldingRemote(std::shared_ptr<test::MemoryDevice> d)
        : Layer(std::make_unique<test::SharedDevice>(std::move(d))) {}
    core::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags f) override {
      if (o >= hold_from) {
        waiting.fetch_add(1);
        boost::asio::steady_timer t(co_await boost::asio::this_coro::executor);
        while (hold.load()) {
          t.expires_after(std::chrono::milliseconds(1));
          co_await t.async_wait(boost::asio::use_awaitable);
        }
        waiting.fetch_sub(1);
      }
      co_return co_await next().read(b, o, f);
    }
    uint64_t hold_from = UINT64_MAX;
    std::atomic<bool> hold{true};
    std::atomic<int> waiting{0};
  };
  auto remote = std::make_unique<HoldingRemote>(remote_);
  auto* holder = remote.get();
  holder->hold_from = 2 * kChunk;
  h_ = std::make_unique<test::LayerHarness>();
  CacheLayer::Params p;
  p.export_name = "vm";
  p.remote_uri = "memory://remote";
  p.config = config(WriteMode::writeback_local);
  p.config.readahead_chunks = 8;
  p.store = store_.get();
  h_->open(std::move(remote), std::move(p));
  (void)read(0, kChunk);
  (void)read(kChunk, kChunk);  // sequential: read-ahead of chunks 2..9, held
  ASSERT_TRUE(test::eventually([&] { return holder->waiting.load() >= 1; })) << "no read-ahead started";
  auto closed = boost::asio::co_spawn(h_->io(), layer().close(), boost::asio::use_future);
  const bool close_returned_early = closed.wait_for(std::chrono::milliseconds(300)) == std::future_status::ready;
  holder->hold.store(false);
  closed.get();
  ASSERT_TRUE(test::eventually([&] { return holder->waiting.load() == 0; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  h_->crash();
  EXPECT_FALSE(close_returned_early) << "close() returned while read-ahead was still running";
}

}  // namespace
}  // namespace blockway::cache
