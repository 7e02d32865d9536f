// BlockSizeLayer over CheckedDevice over the in-memory fake with a block
// grid: random requests of any alignment against a model (and every request
// that reached the device on the grid), the exact requests an unaligned write
// makes, the partial final block (taken, and refused), errors, and ordering
// under concurrency: unaligned writes into one block, aligned writes against
// RMWs, and random concurrent writers whose bytes nobody may undo.
#include "core/block_size_layer.hpp"

#include "core/checked_device.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>

#include <algorithm>
#include <cerrno>
#include <map>
#include <random>
#include <thread>
#include <vector>

namespace blockway::test {
namespace {

using core::BlockSizeLayer;
using core::ByteRange;
using core::Capabilities;
using core::Extent;
using core::ExtentList;
using core::kExtentHole;
using core::kFastZero;
using core::kFua;
using core::kNoHole;
using core::Support;
using core::Task;
using namespace std::chrono_literals;

std::error_code err(int e) { return core::errno_code(e); }
const std::error_code ok{};

Capabilities caps(bool read_only = false) {
  Capabilities c;
  c.read_only = read_only;
  c.flush = Support::native;
  c.zero = Support::native;
  c.trim = Support::native;
  c.extents = Support::native;
  return c;
}

// Yields to the executor a random number of times (0-3) before every call,
// so that concurrent requests interleave at every step even on one thread.
class YieldingLayer final : public core::Layer {
 public:
  YieldingLayer(std::unique_ptr<BlockDevice> next, uint64_t seed) : Layer(std::move(next)), rng_(seed) {}
  Task<std::error_code> read(std::span<std::byte> b, uint64_t o, core::IoFlags f) override {
    co_await yield();
    co_return co_await next().read(b, o, f);
  }
  Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, core::IoFlags f) override {
    co_await yield();
    co_return co_await next().write(b, o, f);
  }
  Task<std::error_code> zero(ByteRange r, core::IoFlags f) override {
    co_await yield();
    co_return co_await next().zero(r, f);
  }

 private:
  Task<void> yield() {
    int n = 0;
    {
      std::lock_guard lock(mutex_);
      n = static_cast<int>(rng_() % 4);
    }
    const auto ex = co_await boost::asio::this_coro::executor;
    for (int i = 0; i < n; ++i) co_await boost::asio::post(ex, boost::asio::use_awaitable);
  }
  std::mutex mutex_;
  std::mt19937_64 rng_;
};

// MemoryDevice (a grid of `block`) <- [YieldingLayer] <- CheckedDevice <- BlockSizeLayer.
struct Stack {
  Stack(uint64_t size, uint32_t block, bool read_only = false, std::shared_ptr<spdlog::logger> log = nullptr,
        std::optional<uint64_t> yield_seed = std::nullopt) {
    auto m = std::make_unique<MemoryDevice>(core::Geometry{.size = size, .min_block = block}, caps(read_only));
    mem = m.get();
    std::unique_ptr<core::BlockDevice> below = std::move(m);
    if (yield_seed) below = std::make_unique<YieldingLayer>(std::move(below), *yield_seed);
    auto checked = std::make_shared<core::CheckedDevice>(std::move(below), false);
    layer = std::make_unique<BlockSizeLayer>(checked, "test", std::move(log));
  }
  std::error_code read(std::vector<std::byte>& buf, uint64_t off) { return sync_wait(layer->read(buf, off, 0)); }
  std::error_code write(const std::vector<std::byte>& buf, uint64_t off, core::IoFlags f = 0) {
    return sync_wait(layer->write(buf, off, f));
  }
  BlockSizeLayer::Written write_some(const std::vector<std::byte>& buf, uint64_t off) {
    return sync_wait(layer->write_some(buf, off, 0));
  }
  std::error_code zero(ByteRange r, core::IoFlags f = 0) { return sync_wait(layer->zero(r, f)); }
  std::error_code trim(ByteRange r) { return sync_wait(layer->trim(r, 0)); }
  std::error_code status(ByteRange r, ExtentList& out) { return sync_wait(layer->block_status(r, out)); }

  MemoryDevice* mem = nullptr;
  std::unique_ptr<BlockSizeLayer> layer;
};

std::vector<std::byte> filled(size_t n, uint8_t v) { return std::vector<std::byte>(n, std::byte{v}); }

std::vector<std::byte> random_bytes(std::mt19937_64& rng, size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = std::byte(static_cast<uint8_t>(rng()));
  return out;
}

// Every request the device saw starts on its grid and has a length on it,
// or ends at the image's end (CheckedDevice's rule).
void expect_all_on_grid(const MemoryDevice& mem, uint64_t size, uint32_t block) {
  for (const Call& c : mem.log()) {
    if (c.op == Op::flush) continue;
    EXPECT_EQ(c.offset % block, 0u) << "op " << int(c.op) << " at " << c.offset << "+" << c.length;
    EXPECT_TRUE(c.length % block == 0 || c.offset + c.length == size)
        << "op " << int(c.op) << " at " << c.offset << "+" << c.length;
  }
}

TEST(BlockSizeLayer, TakesAnyAlignmentAndOtherwiseShowsTheDevice) {
  Stack s(1 << 20, 4096);
  const auto g = s.layer->geometry();
  EXPECT_EQ(g.size, 1u << 20);
  EXPECT_EQ(g.min_block, 1u);
  EXPECT_GE(g.preferred_block, 4096u);
  EXPECT_EQ(s.layer->block(), 4096u);
  EXPECT_TRUE(s.layer->on_grid(8192, 4096));
  EXPECT_FALSE(s.layer->on_grid(8192, 100));
  EXPECT_EQ(s.layer->capabilities().zero, Support::native);
  EXPECT_EQ(s.layer->describe(), "memory");
}

// ---------------------------------------------------------------- against a model

struct Shape {
  uint32_t block;
  uint64_t size;
};

class BlockSizeModel : public ::testing::TestWithParam<Shape> {};

TEST_P(BlockSizeModel, RandomRequestsOfAnyAlignmentMatchAModel) {
  // Not a structured binding: Clang 14 cannot capture one in a lambda.
  const uint32_t block = GetParam().block;
  const uint64_t size = GetParam().size;
  Stack s(size, block);
  s.mem->fill_pattern(0, size);
  auto model = s.mem->contents(0, size);
  std::mt19937_64 rng(block * 7919 + size);
  auto pick = [&]() -> std::pair<uint64_t, uint64_t> {
    uint64_t off = 0;
    switch (rng() % 4) {
      case 0:  // near a block boundary
        off = std::min<uint64_t>(size, (rng() % (size / block + 1)) * block + rng() % 7) - rng() % 3;
        break;
      case 1:  // near the end
        off = size - std::min<uint64_t>(size, rng() % (2 * block + 3));
        break;
      default:
        off = rng() % (size + 1);
    }
    off = std::min(off, size);
    uint64_t n = rng() % 4 == 0 ? (rng() % 4) * block : rng() % (3 * block + 100);
    if (rng() % 16 == 0) n = rng() % (16 * block);
    return {off, std::min(n, size - off)};
  };
  for (int i = 0; i < 2000; ++i) {
    const auto [off, n] = pick();
    const auto at = model.begin() + static_cast<std::ptrdiff_t>(off);
    switch (rng() % 6) {
      case 0:
      case 1: {
        std::vector<std::byte> got(n);
        ASSERT_EQ(s.read(got, off), ok) << "read " << off << "+" << n;
        ASSERT_TRUE(std::equal(got.begin(), got.end(), at)) << "read " << off << "+" << n;
        break;
      }
      case 2: {
        const auto data = random_bytes(rng, n);
        ASSERT_EQ(s.write(data, off, rng() % 4 == 0 ? kFua : 0), ok) << "write " << off << "+" << n;
        std::copy(data.begin(), data.end(), at);
        break;
      }
      case 3: {
        const auto data = random_bytes(rng, n);
        const auto w = s.write_some(data, off);
        ASSERT_EQ(w.ec, ok) << "write_some " << off << "+" << n;
        ASSERT_EQ(w.written, n);
        std::copy(data.begin(), data.end(), at);
        break;
      }
      case 4: {
        const core::IoFlags flags[] = {0, kNoHole, kFua};
        ASSERT_EQ(s.zero({off, n}, flags[rng() % 3]), ok) << "zero " << off << "+" << n;
        std::fill_n(at, n, std::byte{0});
        break;
      }
      case 5: {  // advisory: the whole blocks inside (the fake zeroes what it trims)
        ASSERT_EQ(s.trim({off, n}), ok) << "trim " << off << "+" << n;
        const uint64_t first = (off + block - 1) / block * block;
        const uint64_t last = (off + n) / block * block;
        if (last > first)
          std::fill(model.begin() + static_cast<std::ptrdiff_t>(first),
                    model.begin() + static_cast<std::ptrdiff_t>(last), std::byte{0});
        break;
      }
    }
  }
  EXPECT_EQ(s.mem->contents(0, size), model);
  expect_all_on_grid(*s.mem, size, block);
}

INSTANTIATE_TEST_SUITE_P(Shapes, BlockSizeModel,
                         ::testing::Values(Shape{4096, 16 * 4096}, Shape{4096, 16 * 4096 + 512},
                                           Shape{512, 100 * 512 + 100}, Shape{1, 50000}),
                         [](const auto& info) {
                           return "block" + std::to_string(info.param.block) + "_size" +
                                  std::to_string(info.param.size);
                         });

// ---------------------------------------------------------------- what reaches the device

TEST(BlockSizeLayer, RequestsOnTheGridPassThroughUnchanged) {
  Stack s(1 << 20, 4096);
  std::vector<std::byte> buf(8192);
  ASSERT_EQ(s.read(buf, 4096), ok);
  ASSERT_EQ(s.write(filled(8192, 1), 16384, kFua), ok);
  ASSERT_EQ(s.zero({32768, 4096}, kNoHole), ok);
  ASSERT_EQ(s.trim({65536, 4096}), ok);
  const std::vector<Call> expect = {{Op::read, 4096, 8192, 0},
                                    {Op::write, 16384, 8192, 0},  // FUA: emulated by CheckedDevice
                                    {Op::flush, 0, 0, 0},
                                    {Op::zero, 32768, 4096, kNoHole},
                                    {Op::trim, 65536, 4096, 0}};
  EXPECT_EQ(s.mem->log(), expect);
}

// Partial, whole, partial: the edge blocks are read and written back, the
// whole blocks between go down from the caller's buffer in one write.
TEST(BlockSizeLayer, AnUnalignedWriteReadModifyWritesOnlyItsEdgeBlocks) {
  Stack s(1 << 20, 4096);
  s.mem->fill_pattern(0, 1 << 20);
  auto expect = s.mem->contents(0, 1 << 20);
  const auto data = filled(14000, 9);
  ASSERT_EQ(s.write(data, 4000), ok);
  std::fill_n(expect.begin() + 4000, 14000, std::byte{9});
  EXPECT_EQ(s.mem->contents(0, 1 << 20), expect);
  const std::vector<Call> calls = {{Op::read, 0, 4096, 0},     {Op::write, 0, 4096, 0},
                                   {Op::write, 4096, 12288, 0}, {Op::read, 16384, 4096, 0},
                                   {Op::write, 16384, 4096, 0}};
  EXPECT_EQ(s.mem->log(), calls);

  // A zero range: zeroes patched into the edges, one WRITE_ZEROES between.
  s.mem->clear_log();
  ASSERT_EQ(s.zero({100, 9000}, kNoHole), ok);
  const std::vector<Call> zcalls = {{Op::read, 0, 4096, 0},
                                    {Op::write, 0, 4096, 0},
                                    {Op::zero, 4096, 4096, kNoHole},
                                    {Op::read, 8192, 4096, 0},
                                    {Op::write, 8192, 4096, 0}};
  EXPECT_EQ(s.mem->log(), zcalls);

  // A read off the grid: one read of the covering blocks.
  s.mem->clear_log();
  std::vector<std::byte> got(10);
  ASSERT_EQ(s.read(got, 8190), ok);
  EXPECT_EQ(s.mem->log(), (std::vector<Call>{{Op::read, 4096, 8192, 0}}));
}

TEST(BlockSizeLayer, TrimShrinksToTheWholeBlocksInside) {
  Stack s(1 << 20, 4096);
  ASSERT_EQ(s.trim({100, 10000}), ok);
  ASSERT_EQ(s.trim({100, 200}), ok);  // no whole block: nothing to do
  EXPECT_EQ(s.mem->log(), (std::vector<Call>{{Op::trim, 4096, 4096, 0}}));
}

TEST(BlockSizeLayer, BlockStatusIsAskedFromTheGridAndCutToTheRange) {
  Stack s(1 << 20, 4096);
  s.mem->set_extents({{50, kExtentHole}, {200, 0}, {10000, kExtentHole}});
  ExtentList out;
  ASSERT_EQ(s.status({4096 + 100, 3000}, out), ok);
  EXPECT_EQ(s.mem->log(), (std::vector<Call>{{Op::block_status, 4096, 4096, 0}}));
  EXPECT_EQ(out, (ExtentList{{150, 0}, {2850, kExtentHole}}));
  // The device describes less than the bytes before the range: the rest of
  // the block is "data, contents unknown".
  s.mem->set_extents({{50, kExtentHole}});
  ASSERT_EQ(s.status({4096 + 100, 9000}, out), ok);
  EXPECT_EQ(out, (ExtentList{{4096 - 100, 0}}));
  EXPECT_EQ(s.status({4096 + 100, 0}, out), err(EINVAL));
}

TEST(BlockSizeLayer, PrefetchIsWidenedToTheGrid) {
  Stack s(1 << 20, 4096);
  ASSERT_EQ(sync_wait(s.layer->prefetch({100, 10})), ok);
  // No native prefetch: CheckedDevice reads the block.
  EXPECT_EQ(s.mem->log(), (std::vector<Call>{{Op::read, 0, 4096, 0}}));
}

// ---------------------------------------------------------------- the partial final block

constexpr uint64_t kTail = 4 * 4096;
constexpr uint64_t kOdd = kTail + 512;

TEST(BlockSizeLayer, ThePartialFinalBlockIsReadAndWritten) {
  Stack s(kOdd, 4096);
  s.mem->fill_pattern(0, kOdd);
  auto expect = s.mem->contents(0, kOdd);
  auto put = [&](uint64_t off, size_t n, uint8_t v) {
    ASSERT_EQ(s.write(filled(n, v), off), ok) << off << "+" << n;
    std::fill_n(expect.begin() + static_cast<std::ptrdiff_t>(off), n, std::byte{v});
  };
  put(kTail + 100, 10, 1);  // inside it
  put(kTail - 96, 600, 2);  // the last whole block's end and its start
  put(kTail, 512, 3);       // all of it: no read needed
  put(kOdd - 1, 1, 4);      // the last byte
  EXPECT_EQ(s.mem->contents(0, kOdd), expect);
  std::vector<std::byte> got(kOdd - 12000);
  ASSERT_EQ(s.read(got, 12000), ok);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), expect.begin() + 12000));
  ASSERT_EQ(s.zero({16300, kOdd - 16300}), ok);
  std::fill(expect.begin() + 16300, expect.end(), std::byte{0});
  EXPECT_EQ(s.mem->contents(0, kOdd), expect);
  expect_all_on_grid(*s.mem, kOdd, 4096);
}

// The device takes whole blocks only: reads and writes up to the partial
// block work, those reaching into it fail with EIO, write_some is short up
// to it, and the log says why, once.
TEST(BlockSizeLayer, APartialFinalBlockTheDeviceRefusesFailsOnlyThere) {
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
  auto log = std::make_shared<spdlog::logger>("block-size-test", sink);
  Stack s(kOdd, 4096, false, log);
  s.mem->refuse_partial_blocks(true);
  s.mem->fill_pattern(0, kOdd);
  auto expect = s.mem->contents(0, kOdd);
  std::vector<std::byte> got(100);
  ASSERT_EQ(s.read(got, kTail - 100), ok);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), expect.begin() + kTail - 100));
  EXPECT_EQ(s.read(got, kTail - 50), err(EIO));
  EXPECT_EQ(s.read(got, kTail + 3), err(EIO));

  const auto data = filled(1000, 7);
  const auto w = s.write_some(data, kTail - 600);
  EXPECT_EQ(w.ec, ok);
  EXPECT_EQ(w.written, 600u);  // short: stops at the final block
  std::fill_n(expect.begin() + kTail - 600, 600, std::byte{7});
  EXPECT_EQ(s.write_some(filled(10, 8), kTail + 1).ec, err(EIO));
  EXPECT_EQ(s.write(filled(500, 9), kTail - 300), err(EIO));  // all or nothing: EIO...
  std::fill_n(expect.begin() + kTail - 300, 300, std::byte{9});  // ...the part before it is written
  EXPECT_EQ(s.zero({kTail - 10, 20}), err(EIO));
  std::fill_n(expect.begin() + kTail - 10, 10, std::byte{0});
  EXPECT_EQ(s.mem->contents(0, kOdd), expect);

  const auto lines = sink->last_formatted();
  const auto said = std::count_if(lines.begin(), lines.end(), [](const std::string& l) {
    return l.find("test: the device refuses the final 512 bytes") != std::string::npos;
  });
  EXPECT_EQ(said, 1) << "logged once per layer";
}

// ---------------------------------------------------------------- errors

TEST(BlockSizeLayer, DeviceErrorsPassThroughAndAFailedReadWritesNothing) {
  Stack s(1 << 20, 4096);
  s.mem->fail(Op::read, ETIMEDOUT);
  EXPECT_EQ(s.write(filled(10, 1), 5), err(ETIMEDOUT));
  EXPECT_EQ(s.zero({5, 10}), err(ETIMEDOUT));
  EXPECT_EQ(s.mem->calls(Op::write) + s.mem->calls(Op::zero), 0u);
  std::vector<std::byte> got(10);
  EXPECT_EQ(s.read(got, 5), err(ETIMEDOUT));
  s.mem->fail(Op::read, 0);
  s.mem->fail(Op::write, ENOSPC);
  EXPECT_EQ(s.write(filled(10, 1), 5), err(ENOSPC));
  const auto w = s.write_some(filled(10, 1), 5);
  EXPECT_EQ(w.ec, err(ENOSPC));
  EXPECT_EQ(w.written, 0u);
  EXPECT_EQ(s.write(filled(4096, 1), 0), err(ENOSPC));  // aligned
}

// Refused as CheckedDevice would, before anything reaches the device.
TEST(BlockSizeLayer, BadRequestsAreRefusedBeforeAnyReadModifyWrite) {
  constexpr uint64_t kSize = 1 << 20;
  Stack s(kSize, 4096);
  std::vector<std::byte> got(100);
  EXPECT_EQ(s.read(got, kSize - 50), err(EINVAL));
  EXPECT_EQ(s.write(filled(100, 1), kSize - 50), err(ENOSPC));
  EXPECT_EQ(s.write(filled(100, 1), UINT64_MAX - 10), err(ENOSPC));
  EXPECT_EQ(s.zero({kSize - 50, 100}), err(ENOSPC));
  EXPECT_EQ(s.trim({kSize - 50, 100}), err(ENOSPC));
  EXPECT_EQ(s.write(filled(100, 1), 5, kNoHole), err(EINVAL));
  EXPECT_EQ(s.zero({5, 100}, 1u << 7), err(EINVAL));
  // FAST_ZERO forbids the slow way: an RMW of the edges is one.
  EXPECT_EQ(s.zero({5, 100}, kFastZero), err(ENOTSUP));
  EXPECT_EQ(s.zero({4096, 4096}, kFastZero), ok);  // on the grid: the device's native zero
  EXPECT_EQ(s.mem->log(), (std::vector<Call>{{Op::zero, 4096, 4096, kFastZero}}));
  // Empty requests off the grid do nothing.
  s.mem->clear_log();
  EXPECT_EQ(s.write({}, 5), ok);
  EXPECT_EQ(s.zero({5, 0}), ok);
  std::vector<std::byte> none;
  EXPECT_EQ(s.read(none, 5), ok);
  EXPECT_TRUE(s.mem->log().empty());

  Stack ro(kSize, 4096, /*read_only=*/true);
  EXPECT_EQ(ro.write(filled(10, 1), 5), err(EPERM));
  EXPECT_EQ(ro.zero({5, 10}), err(EPERM));
  EXPECT_EQ(ro.trim({5, 10000}), err(EPERM));
  EXPECT_TRUE(ro.mem->log().empty());
}

// ---------------------------------------------------------------- ordering

// A background io_context with `threads` threads for requests kept in
// flight while the test thread works the device's gates.
class Loop {
 public:
  explicit Loop(int threads) : guard_(io_.get_executor()) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  ~Loop() {
    guard_.reset();
    for (auto& t : threads_) t.join();
  }
  // Starts task; `done` counts completions, `errors` failed ones.
  void spawn(Task<std::error_code> task) {
    boost::asio::co_spawn(io_, std::move(task), [this](std::exception_ptr e, std::error_code ec) {
      if (e || ec) errors.fetch_add(1);
      done.fetch_add(1);
    });
  }
  std::atomic<int> done{0};
  std::atomic<int> errors{0};

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_;
  std::vector<std::thread> threads_;
};

// Requests kept in flight on two threads over a 4096-byte grid, with a
// whole block and a patch of it to write.
class BlockSizeLayerOrder : public ::testing::Test {
 protected:
  Stack s{1 << 20, 4096};
  const std::vector<std::byte> whole = filled(4096, 'W');
  const std::vector<std::byte> patch = filled(16, 'U');
  Loop loop{2};  // last: its threads end before the buffers and the stack go
};

// Several unaligned writes into one block at once: each RMW waits for the one
// before, so none undoes another's bytes. The device's reads are held until
// every write has arrived, and its writes until every read that could start
// has read.
TEST_F(BlockSizeLayerOrder, UnalignedWritesIntoOneBlockTakeTurns) {
  constexpr int kWriters = 8;
  constexpr size_t kSlot = 16;
  std::vector<std::vector<std::byte>> data;
  for (int i = 0; i < kWriters; ++i) data.push_back(filled(kSlot, static_cast<uint8_t>('A' + i)));
  s.mem->close_gate(Op::read);
  s.mem->close_gate(Op::write);
  for (int i = 0; i < kWriters; ++i) loop.spawn(s.layer->write(data[i], 5 + i * kSlot, 0));
  EXPECT_TRUE(eventually([&] { return s.mem->in_flight(Op::read) >= 1; }, 5s));
  std::this_thread::sleep_for(100ms);
  s.mem->open_gate(Op::read);
  std::this_thread::sleep_for(100ms);  // without the lock, every one has read the old block now
  s.mem->open_gate(Op::write);
  ASSERT_TRUE(eventually([&] { return loop.done == kWriters; }, 10s));
  EXPECT_EQ(loop.errors, 0);
  const auto got = s.mem->contents(0, 4096);
  for (int i = 0; i < kWriters; ++i)
    for (size_t j = 0; j < kSlot; ++j)
      EXPECT_EQ(got[5 + i * kSlot + j], std::byte(static_cast<uint8_t>('A' + i))) << "writer " << i;
  EXPECT_EQ(s.mem->max_in_flight(Op::read), 1u);  // the RMWs took turns
}

// An aligned write of a block while an RMW of it is under way waits for it:
// it reaches the device only after the RMW wrote the block back.
TEST_F(BlockSizeLayerOrder, AnAlignedWriteWaitsForAReadModifyWriteOfItsBlock) {
  s.mem->close_gate(Op::read);
  loop.spawn(s.layer->write(patch, 5, 0));  // holds the lock; its read waits at the gate
  ASSERT_TRUE(eventually([&] { return s.mem->in_flight(Op::read) == 1; }, 5s));
  loop.spawn(s.layer->write(whole, 0, 0));
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(s.mem->calls(Op::write), 0u) << "the aligned write went ahead of the RMW";
  s.mem->open_gate(Op::read);
  ASSERT_TRUE(eventually([&] { return loop.done == 2; }, 10s));
  EXPECT_EQ(loop.errors, 0);
  EXPECT_EQ(s.mem->contents(0, 4096), whole);  // the later write wins
}

// The other way round: an RMW of a block that an aligned write (which took
// no lock) is still writing waits for it before it reads the block.
TEST_F(BlockSizeLayerOrder, AReadModifyWriteWaitsForAnAlignedWriteInFlight) {
  s.mem->close_gate(Op::write);
  loop.spawn(s.layer->write(whole, 0, 0));  // at the device, held at the gate
  ASSERT_TRUE(eventually([&] { return s.mem->in_flight(Op::write) == 1; }, 5s));
  loop.spawn(s.layer->zero({5, 16}, 0));
  loop.spawn(s.layer->write(patch, 30, 0));
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(s.mem->calls(Op::read), 0u) << "an RMW read the block under an aligned write in flight";
  s.mem->open_gate(Op::write);
  ASSERT_TRUE(eventually([&] { return loop.done == 3; }, 10s));
  EXPECT_EQ(loop.errors, 0);
  auto expect = whole;
  std::fill_n(expect.begin() + 5, 16, std::byte{0});
  std::fill_n(expect.begin() + 30, 16, std::byte{'U'});
  EXPECT_EQ(s.mem->contents(0, 4096), expect);
}

// Random writers at once, every request interleaved with the others at
// every step (one thread: by the yielding layer; two: also in parallel):
// RMW writers each own slots in 4 shared blocks (one slot per block, plus
// slots across block boundaries), and one writer writes and zeroes whole
// blocks. Nobody's bytes may be undone: the bytes outside every slot hold
// the whole-block writer's last value, and every slot either its owner's
// last value or that (whichever came last), never an older one.
class BlockSizeLayerStress : public ::testing::TestWithParam<int> {};

TEST_P(BlockSizeLayerStress, ConcurrentWritersNeverUndoEachOther) {
  constexpr uint32_t kBlock = 4096;
  constexpr int kBlocks = 4;
  constexpr int kRmwWriters = 6;
  constexpr int kRounds = 60;
  const int threads = GetParam();
  Stack s(64 * kBlock, kBlock, false, nullptr, /*yield_seed=*/threads * 101);
  struct Slot {
    uint64_t off;
    size_t len;
  };
  // Writer k's slot in block b; writer kRmwWriters's slots straddle blocks.
  auto slot = [&](int k, int b) -> Slot {
    if (k == kRmwWriters) return {static_cast<uint64_t>(b + 1) * kBlock - 100, 200};
    return {static_cast<uint64_t>(b) * kBlock + 100 + k * 500, 300};
  };
  // Last value written per (writer, block), and per block by the whole-block writer.
  std::map<std::pair<int, int>, uint8_t> last;
  std::vector<uint8_t> whole_last(kBlocks, 0);
  s.mem->fill(0, 64 * kBlock, std::byte{0});
  auto rmw_writer = [&](int k) -> Task<std::error_code> {
    std::mt19937_64 r(1000 + k);
    for (int i = 0; i < kRounds; ++i) {
      const int b = static_cast<int>(r() % (k == kRmwWriters ? kBlocks - 1 : kBlocks));
      const Slot sl = slot(k, b);
      const auto v = static_cast<uint8_t>(1 + (k * kRounds + i) % 250);
      std::error_code ec;
      if (r() % 5 == 0) {
        ec = co_await s.layer->zero({sl.off, sl.len}, 0);
        last[{k, b}] = 0;
      } else {
        std::vector<std::byte> data(sl.len, std::byte{v});
        ec = co_await s.layer->write(data, sl.off, 0);
        last[{k, b}] = v;
      }
      if (ec) co_return ec;
    }
    co_return std::error_code{};
  };
  auto whole_writer = [&]() -> Task<std::error_code> {
    std::mt19937_64 r(99);
    for (int i = 0; i < kRounds * 2; ++i) {
      const int b = static_cast<int>(r() % kBlocks);
      const auto v = static_cast<uint8_t>(0x80 + i % 120);
      std::error_code ec;
      if (r() % 4 == 0) {
        ec = co_await s.layer->zero({static_cast<uint64_t>(b) * kBlock, kBlock}, 0);
        whole_last[b] = 0;
      } else {
        std::vector<std::byte> data(kBlock, std::byte{v});
        ec = co_await s.layer->write(data, static_cast<uint64_t>(b) * kBlock, 0);
        whole_last[b] = v;
      }
      if (ec) co_return ec;
    }
    co_return std::error_code{};
  };
  auto reader = [&]() -> Task<std::error_code> {
    std::mt19937_64 r(5);
    std::vector<std::byte> buf(3 * kBlock);
    for (int i = 0; i < kRounds; ++i) {
      const uint64_t off = r() % (kBlocks * kBlock);
      const size_t n = 1 + r() % (2 * kBlock);
      if (auto ec = co_await s.layer->read(std::span(buf).first(n), off, 0)) co_return ec;
    }
    co_return std::error_code{};
  };
  {
    Loop loop(threads);
    // Every entry exists before the writers start: each then only assigns
    // its own (no change to the map's shape from two threads).
    for (int k = 0; k <= kRmwWriters; ++k)
      for (int b = 0; b < kBlocks; ++b) last[{k, b}] = 0xff;
    for (int k = 0; k <= kRmwWriters; ++k) loop.spawn(rmw_writer(k));
    loop.spawn(whole_writer());
    loop.spawn(reader());
    ASSERT_TRUE(eventually([&] { return loop.done == kRmwWriters + 3; }, 60s));
    EXPECT_EQ(loop.errors, 0);
  }
  const auto got = s.mem->contents(0, kBlocks * kBlock);
  std::vector<bool> in_slot(got.size());
  for (int k = 0; k <= kRmwWriters; ++k) {
    for (int b = 0; b < kBlocks; ++b) {
      if (k == kRmwWriters && b == kBlocks - 1) continue;
      const Slot sl = slot(k, b);
      const uint8_t mine = last[{k, b}];
      // A straddling slot spans two blocks: either side may be newer.
      for (size_t j = 0; j < sl.len; ++j) {
        const uint64_t pos = sl.off + j;
        in_slot[pos] = true;
        const uint8_t whole = whole_last[pos / kBlock];
        const auto v = static_cast<uint8_t>(got[pos]);
        EXPECT_TRUE((mine != 0xff && v == mine) || v == whole)
            << "writer " << k << " block " << b << " byte " << pos << ": " << int(v) << " (its last "
            << int(mine) << ", the block's last " << int(whole) << ")";
      }
    }
  }
  for (size_t pos = 0; pos < got.size(); ++pos) {
    if (in_slot[pos]) continue;
    ASSERT_EQ(static_cast<uint8_t>(got[pos]), whole_last[pos / kBlock])
        << "byte " << pos << " outside every slot was undone by an RMW";
  }
  expect_all_on_grid(*s.mem, 64 * kBlock, kBlock);
}

INSTANTIATE_TEST_SUITE_P(Threads, BlockSizeLayerStress, ::testing::Values(1, 2));

}  // namespace
}  // namespace blockway::test
