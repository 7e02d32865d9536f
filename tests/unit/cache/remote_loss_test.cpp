// Unit tests for cache/cache_layer riding through a remote that lost writes
// it had acknowledged: the remote's session died before a flush covered
// them, and the flush on the new session says so (writes_lost_error(), what
// the RetryLayer returns). The cache still holds those bytes where a chunk
// is present: it writes them again, and the client's FLUSH succeeds. Where
// it does not hold them, the FLUSH fails once with EIO.
#include "cache/cache_layer.hpp"

#include "core/remote_device.hpp"
#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <random>
#include <thread>

namespace blockway::cache {
namespace {

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 16;
constexpr uint64_t kSize = kChunk * kChunks;

// A remote with a volatile write cache whose session can be lost: lose()
// throws away every write not flushed yet (as a server restart does), and the
// next flush reports it, as the RetryLayer does after a reconnect;
// lose_at_next_flush() does the same just before the next flush.
class LosingRemote final : public core::BlockDevice {
 public:
  // fua=false: the remote has no FUA (the cache emulates it with a flush).
  LosingRemote(std::shared_ptr<test::VolatileDevice> d, bool fua) : d_(std::move(d)), fua_(fua) {}
  [[nodiscard]] core::Geometry geometry() const noexcept override { return d_->geometry(); }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override {
    auto c = d_->capabilities();
    if (!fua_) c.fua = core::Support::none;
    return c;
  }
  [[nodiscard]] std::string describe() const override { return "losing"; }
  core::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags f) override {
    return d_->read(b, o, f);
  }
  core::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, core::IoFlags f) override {
    return d_->write(b, o, f);
  }
  core::Task<std::error_code> trim(core::ByteRange r, core::IoFlags f) override { return d_->trim(r, f); }
  core::Task<std::error_code> zero(core::ByteRange r, core::IoFlags f) override { return d_->zero(r, f); }
  core::Task<std::error_code> block_status(core::ByteRange r, core::ExtentList& out) override {
    return d_->block_status(r, out);
  }
  core::Task<std::error_code> prefetch(core::ByteRange r) override { return d_->prefetch(r); }
  core::Task<std::error_code> flush() override {
    if (failing_.load()) co_return core::errno_code(EIO);
    if (lose_at_flush_.exchange(false)) lose();
    auto ec = co_await d_->flush();
    if (!ec && lost_.exchange(false)) co_return core::writes_lost_error();
    co_return ec;
  }
  void lose() {
    std::mt19937_64 rng(1);
    d_->crash(rng, false);
    lost_.store(true);
  }
  void lose_at_next_flush() { lose_at_flush_.store(true); }
  void fail_flushes(bool on) { failing_.store(on); }

 private:
  std::shared_ptr<test::VolatileDevice> d_;
  const bool fua_;
  std::atomic<bool> lost_{false}, lose_at_flush_{false}, failing_{false};
};

class RemoteLossTest : public test::MemoryRemoteLayerTest {
 protected:
  RemoteLossTest() : MemoryRemoteLayerTest(kChunk, kSize) {}

  CacheLayer& open(WriteMode mode, uint64_t capacity_chunks = 0, bool remote_fua = true) {
    volatile_ = std::make_shared<test::VolatileDevice>(kSize);
    volatile_->fill_both(pattern(0, kSize));
    auto remote = std::make_unique<LosingRemote>(volatile_, remote_fua);
    losing_ = remote.get();
    auto cfg = config(mode);
    cfg.writeback_delay = std::chrono::seconds(60);  // write-back only when a FLUSH asks
    cfg.capacity = capacity_chunks * kChunk;
    return open_layer(cfg, std::move(remote), capacity_chunks > 0);
  }
  std::error_code flush() { return h_->run(layer().flush()); }
  // The model: the remote's original bytes with `data` at `off`.
  static std::vector<std::byte> with(std::vector<std::byte> base, uint64_t base_off, uint64_t off,
                                     const std::vector<std::byte>& data) {
    std::copy(data.begin(), data.end(), base.begin() + static_cast<long>(off - base_off));
    return base;
  }

  std::shared_ptr<test::VolatileDevice> volatile_;
  LosingRemote* losing_ = nullptr;
};

using test::bytes;

// writeback: FLUSH writes chunk 1 back; the remote loses it before the flush
// covers it. The FLUSH writes it again on the new session and succeeds.
TEST_F(RemoteLossTest, WritebackFlushWritesLostChunksAgainAndSucceeds) {
  auto& l = open(WriteMode::writeback);
  ASSERT_FALSE(write(0, bytes(kChunk, 0xa1)));
  ASSERT_FALSE(flush());
  const auto b = bytes(8192, 0xb2);
  ASSERT_FALSE(write(kChunk + 4096, b));
  losing_->lose_at_next_flush();
  auto ec = flush();
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(volatile_->durable(0, kChunk), bytes(kChunk, 0xa1));
  EXPECT_EQ(volatile_->durable(kChunk, kChunk), with(pattern(kChunk, kChunk), kChunk, kChunk + 4096, b));
  EXPECT_EQ(l.stats().lost_write_reports, 1u);
  EXPECT_GE(l.stats().replayed_chunks, 1u);
  EXPECT_EQ(l.stats().failed_requests, 0u);
}

// writethrough over a present chunk: the cache holds the written chunk whole,
// so a write the remote lost is written again from it.
TEST_F(RemoteLossTest, WritethroughOverAPresentChunkIsWrittenAgain) {
  auto& l = open(WriteMode::writethrough);
  (void)read(2 * kChunk, kChunk);  // chunk 2 present
  const auto c = bytes(4096, 0xc3);
  ASSERT_FALSE(write(2 * kChunk + 8192, c));
  losing_->lose();  // the remote restarts: the write is gone there
  EXPECT_EQ(volatile_->current(2 * kChunk + 8192, 4096), pattern(2 * kChunk + 8192, 4096));
  auto ec = flush();
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(volatile_->durable(2 * kChunk, kChunk), with(pattern(2 * kChunk, kChunk), 2 * kChunk, 2 * kChunk + 8192, c));
  EXPECT_EQ(read(2 * kChunk + 8192, 4096), c);
  EXPECT_EQ(l.stats().dirty_bytes, 0u);
}

// writethrough into an absent chunk, in part: the cache never had those
// bytes. The FLUSH fails once with EIO; the export goes on.
TEST_F(RemoteLossTest, WritethroughIntoAnAbsentChunkFailsTheFlushOnce) {
  auto& l = open(WriteMode::writethrough);
  ASSERT_FALSE(write(5 * kChunk + 4096, bytes(4096, 0xd4)));
  losing_->lose();
  EXPECT_EQ(flush(), core::errno_code(EIO));
  EXPECT_FALSE(flush());  // reported once
  ASSERT_FALSE(write(5 * kChunk, bytes(4096, 0xd5)));
  EXPECT_FALSE(flush());
  EXPECT_EQ(volatile_->durable(5 * kChunk, 4096), bytes(4096, 0xd5));
  EXPECT_EQ(l.stats().failed_requests, 1u);
}

// A FUA write whose emulating flush reports the loss sends itself again.
TEST_F(RemoteLossTest, WritethroughFuaIsDurableDespiteALossReportedByItsFlush) {
  auto& l = open(WriteMode::writethrough, 0, /*remote_fua=*/false);
  (void)read(0, kChunk);
  losing_->lose_at_next_flush();  // the FUA write itself is lost before its flush
  ASSERT_FALSE(write(4096, bytes(4096, 0xe5), core::kFua));
  EXPECT_EQ(volatile_->durable(4096, 4096), bytes(4096, 0xe5));
  EXPECT_EQ(l.stats().lost_write_reports, 1u);
}

// With a capacity, a chunk written through stays in the cache (pinned, not
// evicted) until a remote flush covers it, so that it can be written again.
TEST_F(RemoteLossTest, EvictionKeepsWrittenChunksUntilARemoteFlushCoversThem) {
  auto& l = open(WriteMode::writethrough, 2);
  losing_->fail_flushes(true);  // no background flush releases the pin
  const auto e = bytes(kChunk, 0xe6);
  ASSERT_FALSE(write(3 * kChunk, e));  // whole chunk: allocated in the cache
  for (uint64_t c = 8; c < 14; ++c) (void)read(c * kChunk, kChunk);
  ASSERT_TRUE(test::eventually([&] { return l.stats().evictions >= 4; }, std::chrono::seconds(10)));
  core::ExtentList st;
  ASSERT_FALSE(h_->run(l.cache_status({3 * kChunk, kChunk}, st)));
  EXPECT_EQ(st.at(0).flags & 1, 1u) << "a chunk the remote may still lose was evicted";
  losing_->fail_flushes(false);
  losing_->lose();
  auto ec = flush();
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(volatile_->durable(3 * kChunk, kChunk), e);
}

}  // namespace
}  // namespace blockway::cache
