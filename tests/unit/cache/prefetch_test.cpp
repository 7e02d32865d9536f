// Unit tests for prefetch, detach (local mode) and set_mode of the cache
// layer, over an in-memory remote that counts and logs every call.
#include "cache/cache_layer.hpp"

#include "cache/prefetcher.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <future>
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
constexpr uint64_t kChunks = 128;
constexpr uint64_t kSize = kChunk * kChunks;  // 8 MiB

class PrefetchTest : public test::MemoryRemoteLayerTest {
 protected:
  PrefetchTest() : MemoryRemoteLayerTest(kChunk, kSize) { writeback_delay_ = 60s; }  // write-back only when a test asks

  CacheLayer& open_with(const CacheConfig& cfg, std::unique_ptr<core::BlockDevice> remote = nullptr) {
    return open_layer(cfg, std::move(remote), true);
  }
  CacheLayer& open(WriteMode mode) { return open_with(config(mode)); }
  // A writethrough cache that prefetches the whole image, then detaches itself.
  CacheConfig auto_detach_config() {
    auto cfg = config(WriteMode::writethrough);
    cfg.prefetch_auto = true;
    cfg.auto_detach = true;
    return cfg;
  }
  core::PrefetchStatus status() { return layer().report().prefetch; }
  // Waits (bounded) until pred() holds.
  static bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds limit = 20s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (pred()) return true;
      std::this_thread::sleep_for(5ms);
    }
    return pred();
  }
  bool wait_done() {
    return wait_until([&] { return status().state == PrefetchState::done || status().state == PrefetchState::failed; });
  }
  uint64_t remote_read_bytes() {
    uint64_t n = 0;
    for (const auto& c : remote_->log_of(Op::read)) n += c.length;
    return n;
  }
  // No byte was read from the remote twice.
  void expect_no_overlapping_reads() {
    auto reads = remote_->log_of(Op::read);
    std::sort(reads.begin(), reads.end(), [](const auto& a, const auto& b) { return a.offset < b.offset; });
    for (size_t i = 1; i < reads.size(); ++i)
      EXPECT_GE(reads[i].offset, reads[i - 1].offset + reads[i - 1].length) << "read at " << reads[i].offset;
  }
  std::array<uint64_t, test::kOpCount> remote_calls() {
    std::array<uint64_t, test::kOpCount> out{};
    for (size_t i = 0; i < test::kOpCount; ++i) out[i] = remote_->calls(static_cast<Op>(i));
    return out;
  }
};

TEST_F(PrefetchTest, CopiesEveryChunkInMergedRunsAndMatchesTheRemote) {
  open(WriteMode::writethrough);
  EXPECT_EQ(status().state, PrefetchState::idle);
  auto r = layer().prefetch_start(PrefetchOrder::sequential);
  ASSERT_TRUE(r.ok()) << r.message;
  ASSERT_TRUE(wait_done());
  const auto st = status();
  EXPECT_EQ(st.state, PrefetchState::done) << st.error;
  EXPECT_EQ(st.total_bytes, kSize);
  EXPECT_EQ(st.done_bytes, kSize);
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  EXPECT_EQ(layer().stats().bytes_fetched, kSize);
  // Neighbours were merged: 2 MiB runs, not 64 KiB chunks; nothing twice.
  const auto reads = remote_->log_of(Op::read);
  EXPECT_LE(reads.size(), kSize / Prefetcher::kRunBytes + 2);
  for (const auto& c : reads) EXPECT_LE(c.length, Prefetcher::kRunBytes);
  expect_no_overlapping_reads();
  EXPECT_EQ(remote_read_bytes(), kSize);
  // The cache file is the image, and reads are hits now.
  const auto calls = remote_->calls(Op::read);
  EXPECT_EQ(read(0, kSize), pattern(0, kSize));
  EXPECT_EQ(remote_->calls(Op::read), calls);
  h_->close();
  EXPECT_EQ(cache_file(), pattern(0, kSize));
  // Starting again is fine and has nothing to do.
  open(WriteMode::writethrough);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(remote_->calls(Op::read), calls);
}

TEST_F(PrefetchTest, StartTwiceIsRefusedAndCapacityBelowTheImageIsRefused) {
  open(WriteMode::writethrough);
  remote_->close_gate(Op::read);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  auto again = layer().prefetch_start(PrefetchOrder::hot_first);
  EXPECT_EQ(again.ec, std::errc::connection_already_in_progress) << again.message;
  EXPECT_NE(again.message.find("already running"), std::string::npos) << again.message;
  EXPECT_EQ(layer().prefetch_resume().ec, std::errc::invalid_argument);
  remote_->open_gate(Op::read);
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(layer().prefetch_pause().ec, std::errc::invalid_argument);
  h_->close();

  auto cfg = config(WriteMode::writethrough);
  cfg.capacity = kSize / 2;
  open_with(cfg);
  auto r = layer().prefetch_start(PrefetchOrder::sequential);
  EXPECT_EQ(r.ec, std::errc::no_space_on_device);
  EXPECT_NE(r.message.find("capacity"), std::string::npos) << r.message;
  EXPECT_EQ(status().state, PrefetchState::idle);  // nothing was started
  // Configured to start automatically: a clear failed state instead.
  h_->close();
  cfg.prefetch_auto = true;
  const auto reads = remote_->calls(Op::read);
  open_with(cfg);
  EXPECT_EQ(status().state, PrefetchState::failed);
  EXPECT_NE(status().error.find("capacity"), std::string::npos);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(remote_->calls(Op::read), reads);
}

TEST_F(PrefetchTest, NoDoubleFetchWithConcurrentReadsAndWrites) {
  for (WriteMode mode : {WriteMode::writethrough, WriteMode::writeback}) {
    SCOPED_TRACE(to_string(mode));
    remote_->fill_pattern(0, kSize);
    remote_->clear_log();
    {
      std::error_code ec;
      std::filesystem::remove_all(dir_.str() + "/cache", ec);
    }
    store_ = std::make_unique<MetaStore>(dir_.str() + "/catalogue-" + to_string(mode) + ".db");
    open(mode);
    auto expected = pattern(0, kSize);
    ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
    // Client traffic all over the image while the prefetch runs: reads,
    // partial writes and whole-chunk writes, many at once.
    std::vector<std::future<std::error_code>> pending;
    std::vector<std::vector<std::byte>> bufs(96);
    for (int i = 0; i < 96; ++i) {
      const uint64_t chunk = (static_cast<uint64_t>(i) * 37) % kChunks;
      const uint64_t off = chunk * kChunk + (i % 3 == 0 ? 0 : 4096 * (i % 7));
      const uint64_t len = i % 3 == 0 ? kChunk : 8192;
      bufs[i].assign(len, std::byte(static_cast<uint8_t>(0x40 + i)));
      if (i % 2 == 0) {
        pending.push_back(boost::asio::co_spawn(h_->io(), layer().write(bufs[i], off, 0), boost::asio::use_future));
        std::copy(bufs[i].begin(), bufs[i].end(), expected.begin() + static_cast<long>(off));
      } else {
        // A read of what the image holds at the time: check only that it works.
        pending.push_back(boost::asio::co_spawn(h_->io(), layer().read(bufs[i], off, 0), boost::asio::use_future));
      }
      if (i % 16 == 0) std::this_thread::sleep_for(1ms);
    }
    for (auto& f : pending) EXPECT_FALSE(f.get());
    ASSERT_TRUE(wait_done());
    EXPECT_EQ(status().state, PrefetchState::done) << status().error;
    expect_no_overlapping_reads();
    EXPECT_LE(remote_read_bytes(), kSize);
    EXPECT_EQ(read(0, kSize), expected);
    h_->close();
    EXPECT_EQ(cache_file(), expected);
  }
}

TEST_F(PrefetchTest, PauseStopsNewRunsAndResumeFinishes) {
  open(WriteMode::writethrough);
  layer().prefetch_set_rate(4u << 20);  // 4 MiB/s: about 2 s for the image
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_until([&] { return status().done_bytes >= kSize / 8; }));
  auto r = layer().prefetch_pause();
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(status().state, PrefetchState::paused);
  std::this_thread::sleep_for(100ms);  // runs in flight end
  const auto calls = remote_->calls(Op::read);
  const auto done = status().done_bytes;
  std::this_thread::sleep_for(400ms);
  EXPECT_EQ(remote_->calls(Op::read), calls);
  EXPECT_EQ(status().done_bytes, done);
  EXPECT_LT(done, kSize);
  ASSERT_TRUE(layer().prefetch_resume().ok());
  layer().prefetch_set_rate(0);
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(status().state, PrefetchState::done);
  EXPECT_EQ(read(0, kSize), pattern(0, kSize));
  expect_no_overlapping_reads();
}

TEST_F(PrefetchTest, RateLimitIsRoughlyHonoured) {
  auto cfg = config(WriteMode::writethrough);
  cfg.prefetch_rate = 4u << 20;  // 8 MiB at 4 MiB/s: 2 s
  open_with(cfg);
  EXPECT_EQ(status().rate_limit, 4u << 20);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  bool saw_rate = false;
  ASSERT_TRUE(wait_until([&] {
    const auto st = status();
    if (st.state == PrefetchState::running && st.rate > 0) {
      saw_rate = true;
      EXPECT_LT(st.rate, 8.0 * (1u << 20));
      EXPECT_GE(st.eta_seconds, 0);
    }
    return st.state == PrefetchState::done;
  }));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(saw_rate);
  EXPECT_GE(secs, 1.5);
  EXPECT_LE(secs, 6.0);
}

TEST_F(PrefetchTest, HolesAreNotFetchedButWritesIntoThemAre) {
  // Remote: 1 MiB data, 4 MiB reading as zero, 3 MiB data.
  const uint64_t hole_off = 1u << 20, hole_len = 4u << 20;
  remote_->fill(hole_off, hole_len, std::byte{0});
  remote_->set_extents({{hole_off, 0}, {hole_len, core::kExtentHole | core::kExtentZero},
                        {kSize - hole_off - hole_len, 0}});
  open(WriteMode::writethrough);
  // A stale copy in the cache file where the hole is (what an unclean stop
  // may leave in an absent chunk) must not survive.
  {
    std::vector<std::byte> junk(kChunk, std::byte{0x77});
    ASSERT_FALSE(h_->run(layer().write(junk, hole_off, 0)));  // whole chunk: present, remote has it
    ASSERT_FALSE(h_->run(layer().trim({hole_off, kChunk}, 0)));  // remote zero again, cache chunk absent
  }
  // A client write into the hole before the prefetch: the remote's (static)
  // block status still says hole, but this chunk must be fetched.
  const uint64_t written = hole_off + 2 * kChunk + 4096;
  std::vector<std::byte> data(4096, std::byte{0x5a});
  ASSERT_FALSE(write(written, data));
  remote_->clear_log();
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  const auto st = status();
  EXPECT_EQ(st.state, PrefetchState::done) << st.error;
  // Every chunk of the hole except the written one (and the trimmed one, which
  // the trim marked as changed at the remote) is not part of the work.
  EXPECT_EQ(st.total_bytes, kSize - hole_len + 2 * kChunk);
  EXPECT_EQ(st.done_bytes, st.total_bytes);
  EXPECT_EQ(layer().stats().present_bytes, kSize);
  for (const auto& c : remote_->log_of(Op::read)) {
    const bool outside = c.offset + c.length <= hole_off || c.offset >= hole_off + hole_len;
    const bool allowed = c.offset <= written && written < c.offset + c.length;
    const bool trimmed = c.offset <= hole_off && hole_off < c.offset + c.length;
    EXPECT_TRUE(outside || allowed || trimmed) << "read at " << c.offset << " len " << c.length;
  }
  auto expected = pattern(0, kSize);
  std::fill(expected.begin() + static_cast<long>(hole_off), expected.begin() + static_cast<long>(hole_off + hole_len),
            std::byte{0});
  std::copy(data.begin(), data.end(), expected.begin() + static_cast<long>(written));
  EXPECT_EQ(read(0, kSize), expected);
  h_->close();
  EXPECT_EQ(cache_file(), expected);
}

TEST_F(PrefetchTest, ResumesAfterAnUncleanStopAndFetchesOnlyWhatIsMissing) {
  open(WriteMode::writethrough);
  layer().prefetch_set_rate(4u << 20);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_until([&] { return status().done_bytes >= kSize / 3; }));
  std::this_thread::sleep_for(120ms);  // a checkpoint persists what is present
  h_->crash();                         // kill -9: no close
  const auto persisted = store_->load_bitmap("vm", BitmapKind::present, kChunks / 64);
  uint64_t present = 0;
  for (auto w : persisted) present += static_cast<uint64_t>(std::popcount(w));
  ASSERT_GT(present, 0u);
  ASSERT_LT(present, kChunks);
  remote_->clear_log();
  // Not configured to prefetch: it continues because it was running.
  open(WriteMode::writethrough);
  EXPECT_GE(layer().stats().present_bytes, present * kChunk);  // and growing
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(status().state, PrefetchState::done) << status().error;
  EXPECT_EQ(remote_read_bytes(), (kChunks - present) * kChunk) << "present at the restart: " << present;
  expect_no_overlapping_reads();
  EXPECT_EQ(read(0, kSize), pattern(0, kSize));
  // Done is persisted: the next start does nothing.
  h_->close();
  remote_->clear_log();
  open(WriteMode::writethrough);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(status().state, PrefetchState::idle);
  EXPECT_TRUE(remote_->log_of(Op::read).empty());
}

TEST_F(PrefetchTest, PausedStaysPausedAcrossARestart) {
  open(WriteMode::writethrough);
  // Unlimited, the prefetcher may put the whole 8 MiB image in flight (16
  // runs of 1 MiB) before the pause below: it then completes, rightly "done".
  // A low rate keeps it to a run or two, so there is work left to pause.
  layer().prefetch_set_rate(256u << 10);
  remote_->close_gate(Op::read);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::hot_first).ok());
  ASSERT_TRUE(layer().prefetch_pause().ok());
  remote_->open_gate(Op::read);
  h_->close();
  open(WriteMode::writethrough);
  EXPECT_EQ(status().state, PrefetchState::paused);
  EXPECT_EQ(status().order, PrefetchOrder::hot_first);
  ASSERT_TRUE(layer().prefetch_resume().ok());
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(status().state, PrefetchState::done);
}

TEST_F(PrefetchTest, HotFirstReplaysTheFirstReadsOfEarlierSessions) {
  open(WriteMode::writethrough);
  for (uint64_t c : {100u, 7u, 60u, 100u, 61u}) (void)read(c * kChunk, 4096);
  h_->close();  // the profile is saved with the last checkpoint
  const auto profiles = store_->load_profiles("vm");
  ASSERT_EQ(profiles.size(), 1u);
  EXPECT_EQ(profiles[0], (std::vector<uint32_t>{100, 7, 60, 61}));
  // Forget what is present, as if the cache had been emptied.
  store_->commit("vm", {{BitmapKind::present, 0, std::vector<uint64_t>(kChunks / 64, 0)}}, std::nullopt);
  remote_->clear_log();
  open(WriteMode::writethrough);
  ASSERT_EQ(layer().stats().present_bytes, 0u);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::hot_first).ok());
  ASSERT_TRUE(wait_done());
  EXPECT_EQ(status().state, PrefetchState::done) << status().error;
  const auto reads = remote_->log_of(Op::read);
  ASSERT_GE(reads.size(), 3u);
  EXPECT_EQ(reads[0].offset, 100 * kChunk);
  EXPECT_EQ(reads[1].offset, 7 * kChunk);
  EXPECT_EQ(reads[2].offset, 60 * kChunk);
  expect_no_overlapping_reads();
  EXPECT_EQ(read(0, kSize), pattern(0, kSize));
  h_->close();
  // Sessions are kept newest first, and only a few of them.
  for (int i = 0; i < 6; ++i) {
    open(WriteMode::writethrough);
    h_->close();
  }
  EXPECT_LE(store_->load_profiles("vm").size(), static_cast<size_t>(MetaStore::kKeepSessions));
}

TEST_F(PrefetchTest, DetachRefusesMissingAndDirtyChunksAndForceWaitsForWriteBack) {
  open(WriteMode::writeback);
  (void)read(0, 4096);
  auto r = h_->run(layer().detach(false));
  EXPECT_EQ(r.ec, std::errc::device_or_resource_busy);
  EXPECT_NE(r.message.find("127 chunks (7.9 MiB) are not present yet"), std::string::npos) << r.message;
  r = h_->run(layer().detach(true));  // force does not help with missing chunks
  EXPECT_EQ(r.ec, std::errc::device_or_resource_busy);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  std::vector<std::byte> data(3 * kChunk, std::byte{0x33});
  ASSERT_FALSE(write(5 * kChunk, data));
  EXPECT_EQ(layer().report().dirty_bytes, 3 * kChunk);
  r = h_->run(layer().detach(false));
  EXPECT_EQ(r.ec, std::errc::device_or_resource_busy);
  EXPECT_NE(r.message.find("3 chunks (192.0 KiB) are not written back"), std::string::npos) << r.message;
  EXPECT_FALSE(layer().detached());
  EXPECT_NE(remote_->contents(5 * kChunk, data.size()), data);
  r = h_->run(layer().detach(true));
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_TRUE(layer().detached());
  EXPECT_EQ(remote_->contents(5 * kChunk, data.size()), data);  // written back first
  const auto rep = layer().report();
  EXPECT_EQ(rep.mode, "local");
  EXPECT_TRUE(rep.detached);
  EXPECT_EQ(rep.dirty_bytes, 0u);
  EXPECT_EQ(rep.prefetch.state, PrefetchState::done);
  r = h_->run(layer().detach(false));
  EXPECT_TRUE(r.ok());
  EXPECT_NE(r.message.find("already"), std::string::npos);
}

TEST_F(PrefetchTest, AfterDetachTheRemoteIsNeverContactedAgainNorOpenedAfterARestart) {
  const auto cfg = auto_detach_config();
  open_with(cfg);
  ASSERT_TRUE(wait_until([&] { return layer().detached(); }));
  const auto calls = remote_calls();
  auto expected = pattern(0, kSize);
  // Every kind of request, concurrently with nothing else: all local.
  std::vector<std::byte> data(10000, std::byte{0x42});
  ASSERT_FALSE(write(12345, data, core::kFua));
  std::copy(data.begin(), data.end(), expected.begin() + 12345);
  ASSERT_FALSE(h_->run(layer().zero({kChunk * 3, kChunk}, 0)));
  std::fill(expected.begin() + static_cast<long>(kChunk * 3), expected.begin() + static_cast<long>(kChunk * 4),
            std::byte{0});
  ASSERT_FALSE(h_->run(layer().flush()));
  ASSERT_FALSE(h_->run(layer().prefetch({0, kSize})));
  core::ExtentList ext;
  ASSERT_FALSE(h_->run(layer().block_status({0, kSize}, ext)));
  EXPECT_FALSE(ext.empty());
  EXPECT_EQ(read(0, kSize), expected);
  auto r = h_->run(layer().set_mode("writeback"));
  EXPECT_EQ(r.ec, std::errc::operation_not_permitted);
  EXPECT_NE(r.message.find("detached"), std::string::npos);
  EXPECT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  std::this_thread::sleep_for(200ms);  // background loop rounds
  EXPECT_EQ(remote_calls(), calls);
  h_->close();
  EXPECT_EQ(remote_calls(), calls);
  EXPECT_EQ(cache_file(), expected);

  // Restart: the catalogue says detached, so the remote is not needed.
  EXPECT_THROW((void)open_if_detached(*store_, "vm", "memory://other"), std::runtime_error)
      << "a detached export configured with another remote must not open that remote";
  auto standin = open_if_detached(*store_, "vm", "memory://remote");
  ASSERT_NE(standin, nullptr);
  EXPECT_EQ(standin->geometry().size, kSize);
  open_with(cfg, std::move(standin));
  EXPECT_TRUE(layer().detached());
  EXPECT_EQ(layer().report().mode, "local");
  EXPECT_EQ(read(0, kSize), expected);
  std::vector<std::byte> more(4096, std::byte{0x24});
  ASSERT_FALSE(write(kSize - 4096, more));
  ASSERT_FALSE(h_->run(layer().flush()));
  std::copy(more.begin(), more.end(), expected.end() - 4096);
  // An unclean stop in local mode drops nothing (there is nowhere to refetch from).
  h_->crash();
  open_with(cfg, open_if_detached(*store_, "vm", "memory://remote"));
  EXPECT_EQ(read(0, kSize), expected);
  h_->close();
  EXPECT_EQ(remote_calls(), calls);
  // Without its image, a detached export refuses to start.
  std::filesystem::remove(dir_.str() + "/cache/vm.img");
  EXPECT_THROW((void)open_if_detached(*store_, "vm", "memory://remote"), std::runtime_error);
}

// After a detach the cache file is the only up-to-date copy of the image:
// changed settings are refused, never answered by discarding it.
TEST_F(PrefetchTest, ADetachedImageIsNeverDiscardedWhenSettingsChange) {
  const auto cfg = auto_detach_config();
  open_with(cfg);
  ASSERT_TRUE(wait_until([&] { return layer().detached(); }));
  std::vector<std::byte> data(4096, std::byte{0x77});
  ASSERT_FALSE(write(8192, data, core::kFua));
  h_->close();
  const auto image = cache_file();
  ASSERT_EQ(image.size(), kSize);
  auto other = cfg;
  other.chunk_size = kChunk * 2;
  EXPECT_THROW(open_with(other, open_if_detached(*store_, "vm", "memory://remote")), std::runtime_error);
  h_.reset();
  EXPECT_EQ(cache_file(), image) << "the detached image was changed or deleted";
  open_with(cfg, open_if_detached(*store_, "vm", "memory://remote"));
  EXPECT_TRUE(layer().detached()) << "the catalogue forgot the detach";
  EXPECT_EQ(read(8192, 4096), data);
  h_->close();
}

// Eviction would punch chunks out of what is about to be the only copy.
TEST_F(PrefetchTest, DetachIsRefusedWithACapacitySmallerThanTheImage) {
  auto cfg = config(WriteMode::writethrough);
  cfg.capacity = kSize / 2;
  open_with(cfg);
  auto r = h_->run(layer().detach(true));
  EXPECT_EQ(r.ec, std::errc::no_space_on_device);
  EXPECT_NE(r.message.find("capacity"), std::string::npos) << r.message;
  EXPECT_FALSE(layer().detached());
  h_->close();
}

TEST_F(PrefetchTest, AutoDetachRetriesWhileWriteBackFails) {
  auto cfg = config(WriteMode::writeback);
  cfg.auto_detach = true;
  open_with(cfg);
  std::vector<std::byte> data(kChunk, std::byte{0x6b});
  ASSERT_FALSE(write(7 * kChunk, data));  // whole chunk: dirty, no fetch
  remote_->fail(Op::write, EIO);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_until([&] { return status().state == PrefetchState::done; }));
  std::this_thread::sleep_for(300ms);
  EXPECT_FALSE(layer().detached());  // the write-back cannot succeed
  remote_->fail(Op::write, 0);
  ASSERT_TRUE(wait_until([&] { return layer().detached(); }, 10s));
  EXPECT_EQ(remote_->contents(7 * kChunk, kChunk), data);
  EXPECT_EQ(read(7 * kChunk, kChunk), data);
}

TEST_F(PrefetchTest, DetachHoldsNewRequestsUntilTheSwitchAndLosesNone) {
  open(WriteMode::writeback);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  auto expected = pattern(0, kSize);
  // Writes keep coming while detach(force) writes back and switches.
  std::vector<std::future<std::error_code>> pending;
  std::vector<std::vector<std::byte>> bufs(64);
  auto detach = boost::asio::co_spawn(h_->io(), layer().detach(true), boost::asio::use_future);
  for (int i = 0; i < 64; ++i) {
    const uint64_t off = static_cast<uint64_t>(i) * 100000;
    bufs[i].assign(4096, std::byte(static_cast<uint8_t>(i + 1)));
    std::copy(bufs[i].begin(), bufs[i].end(), expected.begin() + static_cast<long>(off));
    pending.push_back(boost::asio::co_spawn(h_->io(), layer().write(bufs[i], off, 0), boost::asio::use_future));
  }
  for (auto& f : pending) EXPECT_FALSE(f.get());
  auto r = detach.get();
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(read(0, kSize), expected);
  h_->close();
  EXPECT_EQ(cache_file(), expected);
}

// close() (shutdown, export-remove) waits for a detach in progress instead
// of persisting the cache and closing the remote under it.
TEST_F(PrefetchTest, CloseWaitsForADetachInProgress) {
  open(WriteMode::writeback);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  std::vector<std::byte> data(2 * kChunk, std::byte{0x5a});
  ASSERT_FALSE(write(3 * kChunk, data));
  remote_->close_gate(Op::write);
  auto detach = boost::asio::co_spawn(h_->io(), layer().detach(true), boost::asio::use_future);
  ASSERT_TRUE(wait_until([&] { return remote_->in_flight(Op::write) > 0; })) << "detach writes back";
  auto closing = boost::asio::co_spawn(h_->io(), layer().close(), boost::asio::use_future);
  EXPECT_EQ(closing.wait_for(300ms), std::future_status::timeout) << "close() did not wait for the detach";
  remote_->open_gate(Op::write);
  const auto r = detach.get();
  EXPECT_TRUE(r.ok()) << r.message;
  closing.get();
  EXPECT_EQ(remote_->contents(3 * kChunk, data.size()), data);
  h_.reset();
  // The next run finds a clean, detached export.
  EXPECT_TRUE(store_->find("vm")->clean);
  auto standin = open_if_detached(*store_, "vm", "memory://remote");
  ASSERT_TRUE(standin);
  auto& again = open_with(config(WriteMode::writeback), std::move(standin));
  EXPECT_TRUE(again.detached());
  EXPECT_FALSE(again.stats().recovered);
}

// A detach or mode change that gets the control lock only after close() had
// it finds the layer closed and switches nothing (no write-back to a closed
// remote, no catalogue write after the clean close).
TEST_F(PrefetchTest, DetachAndSetModeAfterCloseAreRefused) {
  open(WriteMode::writeback);
  ASSERT_TRUE(layer().prefetch_start(PrefetchOrder::sequential).ok());
  ASSERT_TRUE(wait_done());
  std::vector<std::byte> data(kChunk, std::byte{0x6b});
  ASSERT_FALSE(write(2 * kChunk, data));
  auto closing = boost::asio::co_spawn(h_->io(), layer().close(), boost::asio::use_future);
  closing.get();
  const auto writes = remote_->calls(Op::write);
  const auto d = boost::asio::co_spawn(h_->io(), layer().detach(true), boost::asio::use_future).get();
  EXPECT_EQ(d.ec.value(), ESHUTDOWN) << d.message;
  const auto m = boost::asio::co_spawn(h_->io(), layer().set_mode("writethrough"), boost::asio::use_future).get();
  EXPECT_EQ(m.ec.value(), ESHUTDOWN) << m.message;
  EXPECT_EQ(remote_->calls(Op::write), writes) << "nothing written back after close";
  EXPECT_FALSE(layer().detached());
}

TEST_F(PrefetchTest, SetModeSwitchesAndWritesBackWhenTheNewModeNeedsIt) {
  open(WriteMode::writeback);
  std::vector<std::byte> data(kChunk, std::byte{0x11});
  ASSERT_FALSE(write(0, data));
  EXPECT_EQ(layer().report().dirty_bytes, kChunk);
  auto r = h_->run(layer().set_mode("writeback-local"));
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(layer().mode(), WriteMode::writeback_local);
  EXPECT_EQ(layer().report().dirty_bytes, kChunk);  // nothing to do for this switch
  r = h_->run(layer().set_mode("writethrough"));
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(layer().report().mode, "writethrough");
  EXPECT_EQ(layer().report().dirty_bytes, 0u);
  EXPECT_EQ(remote_->contents(0, kChunk), data);
  // Writethrough now: a write reaches the remote at once.
  std::vector<std::byte> more(4096, std::byte{0x22});
  ASSERT_FALSE(write(kChunk, more));
  EXPECT_EQ(remote_->contents(kChunk, 4096), more);
  r = h_->run(layer().set_mode("writethrough"));
  EXPECT_TRUE(r.ok());
  EXPECT_NE(r.message.find("already"), std::string::npos);
  r = h_->run(layer().set_mode("fast"));
  EXPECT_EQ(r.ec, std::errc::invalid_argument);
  EXPECT_NE(r.message.find("writethrough, writeback or writeback-local"), std::string::npos);
  // And back to writeback: writes stay in the cache.
  ASSERT_TRUE(h_->run(layer().set_mode("writeback")).ok());
  ASSERT_FALSE(write(2 * kChunk, data));
  EXPECT_EQ(layer().report().dirty_bytes, kChunk);
  EXPECT_NE(remote_->contents(2 * kChunk, kChunk), data);
  EXPECT_EQ(store_->find("vm")->mode, "writeback");
}

}  // namespace
}  // namespace blockway::cache
