// Unit tests for the deferred fills of cache/cache_deferred_fill.cpp: in the
// write-back modes a write that covers an absent chunk in part is answered
// before the chunk's fetch, which runs behind it and fills only the rest.
// The remote is the in-memory one, held back by its read gate (a slow
// remote) or failing its reads (a remote that is away).
#include "cache/cache_layer.hpp"

#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_future.hpp>

#include <cstdlib>
#include <future>
#include <map>
#include <random>

namespace blockway::cache {
namespace {

using core::ByteRange;
using core::ExtentList;
using test::bytes;
using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kChunks = 80;  // more than CacheLayer::kMaxDeferred
constexpr uint64_t kSize = kChunk * kChunks;

bool ready(std::future<std::error_code>& f, int ms = 0) {
  return f.wait_for(std::chrono::milliseconds(ms)) == std::future_status::ready;
}

class DeferredFill : public test::MemoryRemoteLayerTest, public ::testing::WithParamInterface<WriteMode> {
 protected:
  DeferredFill() : MemoryRemoteLayerTest(kChunk, kSize) {}

  CacheLayer& open() { return open_layer(config(GetParam()), nullptr, false); }
  std::future<std::error_code> spawn(core::Task<std::error_code> t) {
    return boost::asio::co_spawn(h_->io(), std::move(t), boost::asio::use_future);
  }
  std::error_code flush() { return h_->run(layer().flush()); }
  // A written chunk after a FLUSH: present, and dirty unless FLUSH wrote it back.
  uint32_t flushed() const { return GetParam() == WriteMode::writeback ? 1u : 3u; }
  // 1: present, 2: dirty, per ExtentList flags, of one chunk.
  uint32_t state(uint64_t c) {
    ExtentList out;
    EXPECT_FALSE(h_->run(layer().cache_status({c * kChunk, kChunk}, out)));
    return out.size() == 1 ? out[0].flags : 99u;
  }
  // The image as the remote's pattern with `data` at `off`.
  static std::vector<std::byte> merged(uint64_t chunk_off, uint64_t off, const std::vector<std::byte>& data) {
    auto want = pattern(chunk_off, kChunk);
    std::copy(data.begin(), data.end(), want.begin() + static_cast<long>(off - chunk_off));
    return want;
  }
};

INSTANTIATE_TEST_SUITE_P(WriteBackModes, DeferredFill,
                         ::testing::Values(WriteMode::writeback, WriteMode::writeback_local), test::write_mode_name);

TEST_P(DeferredFill, WriteIsAnsweredBeforeTheFetchAndMergedAfter) {
  open();
  remote_->close_gate(Op::read);
  const auto data = bytes(4096, 0xA1);
  auto w = spawn(layer().write(data, 3 * kChunk + 8192, 0));
  ASSERT_TRUE(ready(w, 2000)) << "the write waited for the remote";
  EXPECT_FALSE(w.get());
  ASSERT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) == 1; }));
  EXPECT_EQ(state(3), 0u) << "a pending chunk is neither present nor dirty";
  // Later writes to the pending chunk join it: answered with the fetch still held.
  const auto more = bytes(1000, 0xA2);
  auto w2 = spawn(layer().write(more, 3 * kChunk + 50000, 0));
  ASSERT_TRUE(ready(w2, 2000));
  EXPECT_FALSE(w2.get());
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  remote_->open_gate(Op::read);
  EXPECT_FALSE(flush());
  EXPECT_EQ(state(3), flushed());
  auto want = merged(3 * kChunk, 3 * kChunk + 8192, data);
  std::copy(more.begin(), more.end(), want.begin() + 50000);
  EXPECT_EQ(read(3 * kChunk, kChunk), want);
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  EXPECT_EQ(layer().stats().bytes_fetched, kChunk);
}

TEST_P(DeferredFill, FlushAndReadWaitForThePendingFill) {
  open();
  remote_->close_gate(Op::read);
  const auto data = bytes(3000, 0xB1);
  ASSERT_FALSE(write(5 * kChunk + 777, data));
  auto f = spawn(layer().flush());
  std::vector<std::byte> buf(kChunk);
  auto r = spawn(layer().read(buf, 5 * kChunk, 0));
  EXPECT_FALSE(ready(f, 100)) << "FLUSH answered before the written chunk was complete";
  EXPECT_FALSE(ready(r, 0)) << "a read of a pending chunk did not wait for its fill";
  remote_->open_gate(Op::read);
  ASSERT_TRUE(ready(f, 2000));
  EXPECT_FALSE(f.get());
  ASSERT_TRUE(ready(r, 2000));
  EXPECT_FALSE(r.get());
  EXPECT_EQ(buf, merged(5 * kChunk, 5 * kChunk + 777, data));
  EXPECT_EQ(state(5), flushed());
}

TEST_P(DeferredFill, FuaWriteReturnsOnceItsChunkIsComplete) {
  open();
  const auto data = bytes(512, 0xC1);
  ASSERT_FALSE(write(7 * kChunk + 512, data, core::kFua));
  EXPECT_EQ(state(7), flushed());  // writeback: written back by the FUA
  if (GetParam() == WriteMode::writeback) {
    EXPECT_EQ(remote_->contents(7 * kChunk, kChunk), merged(7 * kChunk, 7 * kChunk + 512, data));
  }
}

TEST_P(DeferredFill, ChunkCoveredByWritesTakesNothingFromTheRemote) {
  open();
  remote_->close_gate(Op::read);
  // A sequential writer, 4 KiB at a time, odd first piece: all answered at once.
  std::vector<std::byte> want(kChunk);
  for (uint64_t pos = 0; pos < kChunk;) {
    const uint64_t n = pos == 0 ? 1000 : std::min<uint64_t>(4096, kChunk - pos);
    auto piece = bytes(n, static_cast<uint8_t>(0x10 + pos / 4096));
    std::copy(piece.begin(), piece.end(), want.begin() + static_cast<long>(pos));
    auto w = spawn(layer().write(piece, 2 * kChunk + pos, 0));
    ASSERT_TRUE(ready(w, 2000)) << "write at " << pos << " waited";
    ASSERT_FALSE(w.get());
    pos += n;
  }
  EXPECT_LE(remote_->calls(Op::read), 1u);
  EXPECT_EQ(state(2), 3u) << "a chunk the writes covered waits for nothing: present and dirty at once";
  remote_->open_gate(Op::read);
  EXPECT_FALSE(flush());
  EXPECT_EQ(read(2 * kChunk, kChunk), want);
  EXPECT_EQ(layer().stats().bytes_fetched, 0u) << "the fetch's bytes were used although writes covered the chunk";
}

// The grace before a fill's fetch (issue 17): a sequential writer's burst
// covers the chunk before the fetch would start, so the remote is never read.
TEST_P(DeferredFill, ABurstOfWritesThatCoversAChunkNeverReadsTheRemote) {
  open();
  layer().set_deferred_grace({std::chrono::seconds(2), std::chrono::seconds(10)});  // a slow machine
  std::vector<std::byte> want(kChunk);
  std::vector<std::future<std::error_code>> writes;
  std::vector<std::vector<std::byte>> pieces;  // alive until the writes end
  pieces.reserve(kChunk / 4096);
  for (uint64_t pos = 0; pos < kChunk; pos += 4096) {  // QD16 4 KiB, as fio writes
    const auto& piece = pieces.emplace_back(bytes(4096, static_cast<uint8_t>(0x40 + pos / 4096)));
    std::copy(piece.begin(), piece.end(), want.begin() + static_cast<long>(pos));
    writes.push_back(spawn(layer().write(piece, 8 * kChunk + pos, 0)));
  }
  for (auto& w : writes) {
    ASSERT_TRUE(ready(w, 2000));
    EXPECT_FALSE(w.get());
  }
  EXPECT_EQ(state(8), 3u) << "covered: present and dirty without the remote";
  EXPECT_EQ(remote_->calls(Op::read), 0u) << "the chunk was fetched although writes covered it";
  EXPECT_FALSE(flush());
  EXPECT_EQ(read(8 * kChunk, kChunk), want);
  EXPECT_EQ(remote_->calls(Op::read), 0u);
  EXPECT_EQ(layer().stats().bytes_fetched, 0u);
}

// A read or FLUSH of a chunk in its grace does not wait the grace out.
TEST_P(DeferredFill, AReadOrFlushEndsTheGraceAtOnce) {
  open();
  layer().set_deferred_grace({std::chrono::seconds(60), std::chrono::seconds(120)});
  const auto a = bytes(4096, 0x51), b = bytes(100, 0x52);
  ASSERT_FALSE(write(14 * kChunk + 4096, a));
  ASSERT_FALSE(write(15 * kChunk + 300, b));
  EXPECT_EQ(remote_->calls(Op::read), 0u) << "fetched during the grace";
  std::vector<std::byte> buf(kChunk);
  auto r = spawn(layer().read(buf, 14 * kChunk, 0));
  ASSERT_TRUE(ready(r, 5000)) << "the read waited out the grace";
  EXPECT_FALSE(r.get());
  EXPECT_EQ(buf, merged(14 * kChunk, 14 * kChunk + 4096, a));
  auto f = spawn(layer().flush());
  ASSERT_TRUE(ready(f, 5000)) << "FLUSH waited out the grace";
  EXPECT_FALSE(f.get());
  EXPECT_EQ(state(15), flushed());
  EXPECT_EQ(read(15 * kChunk, kChunk), merged(15 * kChunk, 15 * kChunk + 300, b));
  EXPECT_EQ(remote_->calls(Op::read), 2u);
}

// A read over several pending chunks urges them all before it waits: their
// fetches overlap (one remote round trip for the read, not one per chunk).
TEST_P(DeferredFill, AReadOverPendingChunksFetchesThemTogether) {
  open();
  layer().set_deferred_grace({std::chrono::seconds(60), std::chrono::seconds(120)});
  constexpr uint64_t kFirst = 40, kN = 8;
  std::vector<std::vector<std::byte>> data;
  for (uint64_t i = 0; i < kN; ++i) {
    data.push_back(bytes(1000, static_cast<uint8_t>(0x70 + i)));
    ASSERT_FALSE(write((kFirst + i) * kChunk + 4096, data.back()));
  }
  EXPECT_EQ(remote_->calls(Op::read), 0u) << "fetched during the grace";
  remote_->close_gate(Op::read);  // a slow remote: every fetch held until the gate opens
  std::vector<std::byte> buf(kN * kChunk);
  auto r = spawn(layer().read(buf, kFirst * kChunk, 0));
  EXPECT_TRUE(test::eventually([&] { return remote_->in_flight(Op::read) == kN; }))
      << "the read waited for one chunk's fetch before urging the next: " << remote_->in_flight(Op::read)
      << " of " << kN << " fetches in flight";
  EXPECT_FALSE(ready(r, 0));
  remote_->open_gate(Op::read);
  ASSERT_TRUE(ready(r, 5000));
  EXPECT_FALSE(r.get());
  EXPECT_EQ(remote_->max_in_flight(Op::read), kN);
  for (uint64_t i = 0; i < kN; ++i) {
    const uint64_t c = kFirst + i;
    const std::vector<std::byte> got(buf.begin() + static_cast<long>(i * kChunk),
                                     buf.begin() + static_cast<long>((i + 1) * kChunk));
    EXPECT_EQ(got, merged(c * kChunk, c * kChunk + 4096, data[i])) << "chunk " << c;
  }
  EXPECT_EQ(remote_->calls(Op::read), kN);
}

// A random writer's chunk (no more writes join) is fetched after one quiet
// step of the default grace, with no read or FLUSH to ask for it.
TEST_P(DeferredFill, ALoneWriteIsFetchedAfterTheGrace) {
  open();
  const auto a = bytes(4096, 0x61);
  ASSERT_FALSE(write(16 * kChunk + 8192, a));
  ASSERT_TRUE(test::eventually([&] { return state(16) == 3u; })) << "the fill never completed on its own";
  EXPECT_EQ(remote_->calls(Op::read), 1u);
  EXPECT_EQ(read(16 * kChunk, kChunk), merged(16 * kChunk, 16 * kChunk + 8192, a));
}

TEST_P(DeferredFill, FailedFetchFailsFlushKeepsTheWriteAndIsTriedAgain) {
  open();
  remote_->fail(Op::read, EIO);
  const auto data = bytes(4096, 0xD1);
  ASSERT_FALSE(write(4 * kChunk + 4096, data)) << "the write itself does not need the remote";
  EXPECT_EQ(flush(), std::errc::io_error);
  std::vector<std::byte> buf(4096);
  EXPECT_TRUE(h_->run(layer().read(buf, 4 * kChunk + 20000, 0))) << "a read of the pending chunk needs the remote";
  EXPECT_EQ(state(4), 0u);
  remote_->fail(Op::read, 0);
  EXPECT_FALSE(flush()) << "the fill is tried again once the remote answers";
  EXPECT_EQ(state(4), flushed());
  EXPECT_EQ(read(4 * kChunk, kChunk), merged(4 * kChunk, 4 * kChunk + 4096, data));
}

TEST_P(DeferredFill, WritesThatCoverAChunkCompleteItWithoutTheRemote) {
  open();
  remote_->fail(Op::read, EIO);
  const auto a = bytes(kChunk - 100, 0xE1), b = bytes(100, 0xE2);
  ASSERT_FALSE(write(6 * kChunk, a));
  EXPECT_EQ(flush(), std::errc::io_error);
  ASSERT_FALSE(write(7 * kChunk - 100, b));
  EXPECT_FALSE(flush()) << "the chunk is covered: no fetch is needed";
  auto want = a;
  want.insert(want.end(), b.begin(), b.end());
  EXPECT_EQ(read(6 * kChunk, kChunk), want);
  remote_->fail(Op::read, 0);
}

TEST_P(DeferredFill, BackPressureBoundsThePendingChunks) {
  open();
  remote_->close_gate(Op::read);
  std::vector<std::future<std::error_code>> writes;
  const auto data = bytes(100, 0xF1);
  for (uint64_t c = 0; c < CacheLayer::kMaxDeferred; ++c) {
    writes.push_back(spawn(layer().write(data, c * kChunk + 10, 0)));
    ASSERT_TRUE(ready(writes.back(), 2000)) << "write " << c << " waited";
  }
  // One more: fetched first, as before deferred fills.
  writes.push_back(spawn(layer().write(data, CacheLayer::kMaxDeferred * kChunk + 10, 0)));
  EXPECT_FALSE(ready(writes.back(), 100)) << "more than kMaxDeferred chunks pending";
  remote_->open_gate(Op::read);
  for (auto& w : writes) EXPECT_FALSE(w.get());
  EXPECT_FALSE(flush());
  for (uint64_t c = 0; c <= CacheLayer::kMaxDeferred; ++c) {
    ASSERT_EQ(state(c), flushed()) << c;
    ASSERT_EQ(read(c * kChunk, kChunk), merged(c * kChunk, c * kChunk + 10, data)) << c;
  }
}

TEST_P(DeferredFill, DropAndDetachLeaveAPendingChunkAlone) {
  open();
  for (uint64_t c = 0; c < kChunks; ++c)
    if (c != 9) (void)read(c * kChunk, 1);  // every chunk present but 9
  remote_->close_gate(Op::read);
  const auto data = bytes(4096, 0x12);
  ASSERT_FALSE(write(9 * kChunk + 4096, data));
  // Detach needs every chunk present: the pending one is not.
  const auto d = h_->run(layer().detach(false));
  EXPECT_EQ(d.ec, std::errc::device_or_resource_busy);
  EXPECT_NE(d.message.find("1 chunks"), std::string::npos) << d.message;
  // Nothing is dirty yet, so drop goes ahead: it must neither drop nor punch
  // the pending chunk's written bytes.
  const auto r = h_->run(layer().drop(false));
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(state(0), 0u);
  remote_->open_gate(Op::read);
  EXPECT_FALSE(flush());
  EXPECT_EQ(state(9), flushed());
  EXPECT_EQ(read(9 * kChunk, kChunk), merged(9 * kChunk, 9 * kChunk + 4096, data));
}

TEST_P(DeferredFill, SwitchToWritethroughWritesPendingChunksBack) {
  open();
  remote_->close_gate(Op::read);
  const auto data = bytes(2048, 0x21);
  ASSERT_FALSE(write(11 * kChunk + 2048, data));
  auto sw = boost::asio::co_spawn(h_->io(), layer().set_mode("writethrough"), boost::asio::use_future);
  EXPECT_NE(sw.wait_for(std::chrono::milliseconds(50)), std::future_status::ready);
  remote_->open_gate(Op::read);
  const auto r = sw.get();
  ASSERT_TRUE(r.ok()) << r.message;
  EXPECT_EQ(remote_->contents(11 * kChunk, kChunk), merged(11 * kChunk, 11 * kChunk + 2048, data));
  EXPECT_EQ(state(11), 1u);
}

TEST_P(DeferredFill, CrashWithAFillPendingKeepsWhatTheLastFlushCovered) {
  open();
  const auto a = bytes(4096, 0x31);
  ASSERT_FALSE(write(12 * kChunk + 4096, a));
  ASSERT_FALSE(flush());
  remote_->fail(Op::read, EIO);  // the next fill cannot finish
  ASSERT_FALSE(write(13 * kChunk + 4096, bytes(4096, 0x32)));
  ASSERT_FALSE(write(12 * kChunk + 8192, bytes(4096, 0x33)));  // present chunk, unflushed
  h_->crash();
  remote_->fail(Op::read, 0);
  open();
  const auto want = merged(12 * kChunk, 12 * kChunk + 4096, a);
  EXPECT_EQ(read(12 * kChunk, 8192), std::vector<std::byte>(want.begin(), want.begin() + 8192));
  // The pending chunk was never persisted present: it reads as the remote.
  EXPECT_EQ(read(13 * kChunk, kChunk), pattern(13 * kChunk, kChunk));
}

// A sequential-ish writer of odd sizes with reads, flushes and crashes,
// against a model: after a crash every byte reads as the last flushed write
// of it or a later one (never older, never garbage); while running, reads
// return the latest write.
TEST_P(DeferredFill, RandomWritesFlushesAndCrashesAgainstAModel) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("BLOCKWAY_DEFERRED_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::mt19937_64 rng(seed);
  SCOPED_TRACE("seed " + std::to_string(seed) + " (BLOCKWAY_DEFERRED_SEED)");
  constexpr uint64_t kSpan = 12 * kChunk;  // the part of the image written
  // Per byte: the value flushed last and the values written since.
  std::vector<uint8_t> durable(kSpan), latest(kSpan);
  std::vector<std::vector<uint8_t>> since(kSpan);
  for (uint64_t i = 0; i < kSpan; ++i) durable[i] = latest[i] = static_cast<uint8_t>(test::MemoryDevice::pattern_at(i));
  open();
  uint8_t value = 1;
  uint64_t pos = 0;
  for (int round = 0; round < 6; ++round) {
    const int ops = 20 + static_cast<int>(rng() % 60);
    for (int i = 0; i < ops; ++i) {
      const auto r = rng() % 100;
      if (r < 65) {
        if (rng() % 5 == 0) pos = rng() % kSpan;
        const uint64_t n = std::min<uint64_t>(kSpan - pos, 1 + rng() % 9000);
        if (++value == 0) value = 1;
        if (rng() % 7 == 0) remote_->fail(Op::read, rng() % 2 ? EIO : 0);
        const bool fua = rng() % 10 == 0;
        const auto ec = write(pos, bytes(n, value), fua ? core::kFua : 0);
        if (!ec) {
          for (uint64_t b = pos; b < pos + n; ++b) {
            latest[b] = value;
            if (fua) {
              durable[b] = value;
              since[b].clear();
            } else {
              since[b].push_back(value);
            }
          }
        } else {
          ASSERT_TRUE(fua) << "a plain write failed: " << ec.message();
          for (uint64_t b = pos; b < pos + n; ++b) {
            latest[b] = value;
            since[b].push_back(value);
          }
        }
        pos = (pos + n) % kSpan;
      } else if (r < 80) {
        if (!flush()) {
          for (uint64_t b = 0; b < kSpan; ++b) {
            durable[b] = latest[b];
            since[b].clear();
          }
        }
      } else {
        const uint64_t off = rng() % kSpan, n = std::min<uint64_t>(kSpan - off, 1 + rng() % 70000);
        std::vector<std::byte> buf(n);
        if (h_->run(layer().read(buf, off, 0))) continue;  // the remote is away: allowed to fail
        for (uint64_t b = 0; b < n; ++b)
          ASSERT_EQ(static_cast<uint8_t>(buf[b]), latest[off + b]) << "live read at " << off + b << ", round " << round;
      }
    }
    h_->crash();
    remote_->fail(Op::read, 0);
    open();
    std::vector<std::byte> img(kSpan);
    ASSERT_FALSE(h_->run(layer().read(img, 0, 0)));
    for (uint64_t b = 0; b < kSpan; ++b) {
      const auto got = static_cast<uint8_t>(img[b]);
      const bool ok = got == durable[b] || std::find(since[b].begin(), since[b].end(), got) != since[b].end();
      ASSERT_TRUE(ok) << "after crash " << round << " byte " << b << " (chunk " << b / kChunk << ") reads " << int(got)
                      << ", flushed " << int(durable[b]);
      durable[b] = latest[b] = got;
      since[b].clear();
    }
  }
}

}  // namespace
}  // namespace blockway::cache
