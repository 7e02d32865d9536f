// Unit tests for cache/cache_layer's start over a remote that changed size
// while the export was not served (CacheLayer::grow_cache): a grow keeps
// every present and dirty chunk; a crash between extending the cache file
// and committing the record leaves a cache that opens; a shrink refuses to
// start over dirty data and starts empty over clean data.
#include "cache/cache_layer.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace blockway::cache {
namespace {

using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 16;
constexpr uint64_t kSize = kChunk * kChunks;

using test::bytes;

class CacheGrowTest : public test::MemoryRemoteLayerTest {
 protected:
  CacheGrowTest() : MemoryRemoteLayerTest(kChunk, kSize) {}

  CacheLayer& open(WriteMode mode) { return open_layer(config(mode), nullptr, false); }
  std::error_code flush() { return h_->run(layer().flush()); }
  std::string cache_path() const { return dir_.str() + "/cache/vm.img"; }

  // The remote now holds `size` bytes: its pattern up to `pattern_end` (what
  // it held before: these tests never write back before the remote
  // changes), zeroes after, as a grown image reads.
  void resize_remote(uint64_t size, uint64_t pattern_end) {
    auto caps = remote_->capabilities();
    remote_ = std::make_shared<test::MemoryDevice>(core::Geometry{size, 1, 4096, 32u << 20}, caps);
    remote_->fill_pattern(0, std::min(size, pattern_end));
  }
  // The image as the tests expect to read it: the pattern up to
  // `pattern_end`, zeroes after.
  static std::vector<std::byte> image(uint64_t off, uint64_t len, uint64_t pattern_end) {
    auto v = pattern(off, len);
    for (uint64_t i = 0; i < len; ++i)
      if (off + i >= pattern_end) v[i] = std::byte{0};
    return v;
  }
};

TEST_F(CacheGrowTest, GrowKeepsEveryPresentAndDirtyChunkAndFetchesOnlyTheNewSpace) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  ASSERT_FALSE(write(2 * kChunk + 10, bytes(100, 0x77)));
  ASSERT_FALSE(flush());
  h_->close();

  resize_remote(kSize + 4 * kChunk, kSize);
  open(WriteMode::writeback_local);
  EXPECT_EQ(layer().chunk_count(), kChunks + 4);
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  EXPECT_EQ(std::filesystem::file_size(cache_path()), kSize + 4 * kChunk);
  auto want = pattern(0, kSize);
  std::fill_n(want.begin() + static_cast<long>(2 * kChunk + 10), 100, std::byte{0x77});
  EXPECT_EQ(read(0, kSize), want);
  EXPECT_TRUE(remote_->log_of(Op::read).empty()) << "present chunks were fetched again";
  EXPECT_EQ(read(kSize, 4 * kChunk), bytes(4 * kChunk, 0));
  EXPECT_EQ(remote_->log_of(Op::read).size(), 1u);
  ASSERT_FALSE(write(kSize + kChunk, bytes(kChunk, 0x55)));  // the new space takes writes
  ASSERT_FALSE(flush());

  // The dirty chunks, old and new, reach the grown remote.
  layer().start();
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(5)));
  EXPECT_EQ(remote_->contents(2 * kChunk + 10, 100), bytes(100, 0x77));
  EXPECT_EQ(remote_->contents(kSize + kChunk, kChunk), bytes(kChunk, 0x55));
  h_->close();

  // The grown record is the cache's from now on.
  remote_->clear_log();
  open(WriteMode::writeback_local);
  EXPECT_EQ(layer().stats().present_bytes, kSize + 4 * kChunk);
  EXPECT_EQ(read(kSize + kChunk, kChunk), bytes(kChunk, 0x55));
  EXPECT_TRUE(remote_->log_of(Op::read).empty());
}

TEST_F(CacheGrowTest, GrowAfterAnUncleanStopKeepsTheDirtyChunks) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  h_->close();
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(5 * kChunk, bytes(kChunk, 0x31)));
  ASSERT_FALSE(flush());  // the dirty bit persisted; no write-back (not started)
  ASSERT_FALSE(write(0, bytes(10, 0x32)));  // and a write-intent in region 0
  h_->crash();

  resize_remote(2 * kSize, kSize);
  open(WriteMode::writeback_local);
  EXPECT_TRUE(layer().stats().recovered);
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  EXPECT_EQ(read(5 * kChunk, kChunk), bytes(kChunk, 0x31));
  EXPECT_EQ(read(kSize, kSize), bytes(kSize, 0));
}

TEST_F(CacheGrowTest, ACrashBetweenExtendingTheFileAndCommittingTheRecordStillOpens) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  ASSERT_FALSE(write(0, bytes(kChunk, 0x42)));
  ASSERT_FALSE(flush());
  h_->close();
  // What a crash after the file was extended, before the commit, leaves:
  // the file at the new size, the record at the old one.
  std::filesystem::resize_file(cache_path(), 2 * kSize);
  resize_remote(2 * kSize, kSize);
  open(WriteMode::writeback_local);
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  EXPECT_EQ(read(0, kChunk), bytes(kChunk, 0x42));
  EXPECT_EQ(read(kSize, kChunk), bytes(kChunk, 0));
}

TEST_F(CacheGrowTest, ACleanLastChunkCutShortByTheOldSizeIsFetchedAgainWhole) {
  const uint64_t old_size = kSize - 1000;
  resize_remote(old_size, old_size);
  open(WriteMode::writeback_local);
  ASSERT_FALSE(h_->run(layer().prefetch({0, old_size})));
  h_->close();

  resize_remote(kSize, old_size);
  open(WriteMode::writeback_local);
  EXPECT_EQ(layer().stats().present_bytes, kSize - kChunk);
  EXPECT_EQ(read(kSize - kChunk, kChunk), image(kSize - kChunk, kChunk, old_size));
  ASSERT_EQ(remote_->log_of(Op::read).size(), 1u);
  EXPECT_EQ(remote_->log_of(Op::read)[0].offset, kSize - kChunk);
}

TEST_F(CacheGrowTest, ADirtyLastChunkCutShortByTheOldSizeStaysDirty) {
  const uint64_t old_size = kSize - 1000;
  resize_remote(old_size, old_size);
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(kSize - kChunk, bytes(100, 0x66)));
  ASSERT_FALSE(flush());
  h_->close();

  resize_remote(kSize, old_size);
  open(WriteMode::writeback_local);
  EXPECT_EQ(layer().stats().dirty_bytes, kChunk);
  auto want = image(kSize - kChunk, kChunk, old_size);
  std::fill_n(want.begin(), 100, std::byte{0x66});
  EXPECT_EQ(read(kSize - kChunk, kChunk), want);
  layer().start();
  ASSERT_TRUE(test::eventually([&] { return layer().stats().dirty_bytes == 0; }, std::chrono::seconds(5)));
  EXPECT_EQ(remote_->contents(kSize - kChunk, kChunk), want);
}

TEST_F(CacheGrowTest, ShrinkUnderDirtyDataRefusesNamingBothSizes) {
  open(WriteMode::writeback_local);
  ASSERT_FALSE(write(kSize - kChunk, bytes(kChunk, 0x13)));
  ASSERT_FALSE(flush());
  h_->close();
  resize_remote(kSize / 2, kSize);
  try {
    open(WriteMode::writeback_local);
    FAIL() << "started over dirty data with a smaller remote";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("shrank from " + std::to_string(kSize) + " to " + std::to_string(kSize / 2) + " bytes"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("grow the image back"), std::string::npos) << what;
  }
  h_.reset();
  // Grown back, the cache opens with its data.
  resize_remote(kSize, kSize);
  open(WriteMode::writeback_local);
  EXPECT_EQ(read(kSize - kChunk, kChunk), bytes(kChunk, 0x13));
}

TEST_F(CacheGrowTest, ShrinkOverACleanCacheStartsEmpty) {
  open(WriteMode::writeback);
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  h_->close();
  resize_remote(kSize / 2, kSize);
  open(WriteMode::writeback);
  EXPECT_EQ(layer().stats().present_bytes, 0u);
  EXPECT_EQ(std::filesystem::file_size(cache_path()), kSize / 2);
  EXPECT_EQ(read(0, kChunk), pattern(0, kChunk));
}

}  // namespace
}  // namespace blockway::cache
